//! Mutual TLS between Ferry nodes (rustls with the ring provider only).
//!
//! Every certificate is issued by the cluster's CA and names exactly one identity as a DNS
//! subject-alternative name: `<node-id>.node.ferry` for a node (both of its services use the
//! node's certificate), `<name>.client.ferry` for an application client or
//! `<name>.operator.ferry` for an operator. The subject's common name is the same full name, so
//! etcd, which takes the common name as the user of a client-certificate connection, can never
//! confuse a client `node-0` with the node `node-0`. Servers take client certificates
//! optionally at the TLS layer and decide per call, from the verified identity and the
//! committee, who may do what (see [`crate::authz`]). Clients always verify that the server's
//! certificate names the node the committee says lives at that address.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::{
    config::{ConfigError, invalid},
    types::NodeId,
};

/// DNS suffix of node identities.
pub const NODE_SUFFIX: &str = ".node.ferry";
/// DNS suffix of client identities.
pub const CLIENT_SUFFIX: &str = ".client.ferry";
/// DNS-name suffix of an operator certificate: `<name>.operator.ferry`.
pub const OPERATOR_SUFFIX: &str = ".operator.ferry";
/// Common name of the CA `ferryctl certs` creates.
const CA_COMMON_NAME: &str = "Ferry cluster CA";

/// The name a node's certificate carries and its peers verify.
pub fn node_server_name(node: &NodeId) -> String {
    format!("{node}{NODE_SUFFIX}")
}

/// A TLS set-up that cannot be used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("FERRY-TLS-001: cannot read {what} {path}: {source}")]
    Read {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not what it should be.
    #[error("FERRY-TLS-002: {what} {path} is not usable: {reason}")]
    Invalid {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("FERRY-TLS-003: cannot generate a certificate: {0}")]
    Generate(String),
    /// Writing generated material failed.
    #[error("FERRY-TLS-004: cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// TLS settings of a service (`[tls]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Mutual TLS on the service port and towards peers. Default true; plaintext only when set
    /// to false explicitly, and then the service warns at start.
    pub enabled: bool,
    /// The cluster CA certificate (PEM). Default `tls/ca.pem`.
    pub ca_file: PathBuf,
    /// This node's certificate (PEM), naming `<node-id>.node.ferry`. Default `tls/node.pem`.
    pub cert_file: PathBuf,
    /// The certificate's private key (PEM). Default `tls/node.key`.
    pub key_file: PathBuf,
    /// With `enabled = false` the service listens only on loopback addresses unless this is
    /// set: plaintext authenticates nobody, so every method (storing, pausing recovery,
    /// streaming shards) is open to anyone who can reach the port. Default false.
    pub insecure_plaintext_beyond_loopback: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            enabled: true,
            ca_file: "tls/ca.pem".into(),
            cert_file: "tls/node.pem".into(),
            key_file: "tls/node.key".into(),
            insecure_plaintext_beyond_loopback: false,
        }
    }
}

impl TlsConfig {
    /// Plaintext (tests and benchmarks that measure the difference).
    pub fn plaintext() -> Self {
        TlsConfig { enabled: false, ..TlsConfig::default() }
    }

    /// TLS from the files `ferryctl certs` writes for `name` in `dir`.
    pub fn from_dir(dir: &Path, name: &str) -> Self {
        TlsConfig {
            enabled: true,
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join(format!("{name}.pem")),
            key_file: dir.join(format!("{name}.key")),
            insecure_plaintext_beyond_loopback: false,
        }
    }

    /// Checks the paths are set when TLS is on, and that plaintext stays on loopback `listen`
    /// addresses unless the insecure setting says otherwise.
    pub fn validate(&self, section: &str, listen: &[std::net::SocketAddr]) -> Result<(), ConfigError> {
        if !self.enabled
            && !self.insecure_plaintext_beyond_loopback
            && let Some(open) = listen.iter().find(|a| !a.ip().is_loopback())
        {
            return Err(invalid(
                &format!("{section}.enabled"),
                format!(
                    "plaintext on {open}, which is not a loopback address, would let anyone who can reach it \
                     call every method; enable TLS, listen on loopback, or set \
                     {section}.insecure_plaintext_beyond_loopback = true to accept that risk"
                ),
            ));
        }
        if self.enabled {
            for (field, path) in
                [("ca_file", &self.ca_file), ("cert_file", &self.cert_file), ("key_file", &self.key_file)]
            {
                if path.as_os_str().is_empty() {
                    return Err(invalid(&format!("{section}.{field}"), "must be set when TLS is enabled"));
                }
            }
        }
        Ok(())
    }

    /// Loads the material, or `None` for plaintext. `expected` is the identity the certificate
    /// must name (a node's own id), checked so a misplaced file fails at start, not at the
    /// first peer call.
    pub fn load(&self, expected: Option<&NodeId>) -> Result<Option<Arc<TlsMaterial>>, TlsError> {
        if !self.enabled {
            return Ok(None);
        }
        let ca = read(&self.ca_file, "CA certificate")?;
        let cert = read(&self.cert_file, "certificate")?;
        let key = read(&self.key_file, "private key")?;
        let leaf = first_pem_der(&cert).ok_or_else(|| TlsError::Invalid {
            what: "certificate",
            path: self.cert_file.display().to_string(),
            reason: "no PEM certificate in it".into(),
        })?;
        let identity = identity_of(&leaf).map_err(|reason| TlsError::Invalid {
            what: "certificate",
            path: self.cert_file.display().to_string(),
            reason,
        })?;
        if let Some(node) = expected
            && identity != PeerIdentity::Node(node.clone())
        {
            return Err(TlsError::Invalid {
                what: "certificate",
                path: self.cert_file.display().to_string(),
                reason: format!("it names {identity}, but this is node {node} (expected {})", node_server_name(node)),
            });
        }
        if first_pem_der(&ca).is_none() {
            return Err(TlsError::Invalid {
                what: "CA certificate",
                path: self.ca_file.display().to_string(),
                reason: "no PEM certificate in it".into(),
            });
        }
        Ok(Some(Arc::new(TlsMaterial {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
            own: identity,
        })))
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read { what, path: path.display().to_string(), source })
}

/// Loaded TLS material: the CA to verify peers with and this party's own identity.
#[derive(Clone)]
pub struct TlsMaterial {
    ca: Certificate,
    identity: Identity,
    own: PeerIdentity,
}

impl std::fmt::Debug for TlsMaterial {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsMaterial({})", self.own)
    }
}

impl TlsMaterial {
    /// Server side: our certificate, and client certificates verified against the CA when
    /// offered. They are optional at the TLS layer so public calls (status, health through the
    /// main port) work without one; each protected call checks the identity itself.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(true)
    }

    /// Client side towards `server`: present our certificate and accept only a server whose
    /// certificate names `server`.
    pub fn client_config(&self, server: &NodeId) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(node_server_name(server))
            // A frozen peer's kernel still accepts the TCP connection, and neither the connect
            // timeout nor the request timeout covers the handshake that follows.
            .timeout(crate::grpc::CONNECT_TIMEOUT)
    }

    /// Client side towards etcd: our certificate, whose common name etcd takes as the user,
    /// and the cluster CA for etcd's server certificate, verified against the endpoint's host.
    pub fn etcd_client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .timeout(crate::grpc::CONNECT_TIMEOUT)
    }

    /// Who this material's certificate names.
    pub fn own_identity(&self) -> &PeerIdentity {
        &self.own
    }
}

/// Who a verified certificate says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A storage node (`<id>.node.ferry`).
    Node(NodeId),
    /// An application client (`<name>.client.ferry`): stores and reads blobs.
    Client(String),
    /// An operator (`<name>.operator.ferry`): what a client may do, plus pausing recovery,
    /// retrying syncs and tuning the node.
    Operator(String),
}

impl PeerIdentity {
    /// The full name the certificate carries (`node-0.node.ferry`): the common name, and the
    /// etcd user of a client-certificate connection.
    pub fn full_name(&self) -> String {
        match self {
            PeerIdentity::Node(id) => node_server_name(id),
            PeerIdentity::Client(name) => format!("{name}{CLIENT_SUFFIX}"),
            PeerIdentity::Operator(name) => format!("{name}{OPERATOR_SUFFIX}"),
        }
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerIdentity::Node(id) => write!(f, "node {id}"),
            PeerIdentity::Client(name) => write!(f, "client {name}"),
            PeerIdentity::Operator(name) => write!(f, "operator {name}"),
        }
    }
}

/// The identity a DER certificate names: exactly one Ferry identity among its DNS names.
pub fn identity_of(der: &[u8]) -> Result<PeerIdentity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let names = cert.subject_alternative_name().map_err(|e| format!("bad subjectAltName: {e}"))?;
    let mut found = Vec::new();
    for name in names.iter().flat_map(|ext| ext.value.general_names.iter()) {
        if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
            if let Some(id) = dns.strip_suffix(NODE_SUFFIX) {
                // Wildcards and malformed ids grant nothing.
                if let Ok(id) = NodeId::new(id) {
                    found.push(PeerIdentity::Node(id));
                }
            } else if let Some(client) = dns.strip_suffix(CLIENT_SUFFIX)
                && NodeId::new(client).is_ok()
            {
                found.push(PeerIdentity::Client(client.to_string()));
            } else if let Some(operator) = dns.strip_suffix(OPERATOR_SUFFIX)
                && NodeId::new(operator).is_ok()
            {
                found.push(PeerIdentity::Operator(operator.to_string()));
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(format!(
            "names no Ferry identity (<node>{NODE_SUFFIX}, <name>{CLIENT_SUFFIX} or <name>{OPERATOR_SUFFIX})"
        )),
        _ => Err("names more than one Ferry identity".into()),
    }
}

fn first_pem_der(pem: &[u8]) -> Option<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_slice_iter(pem).next()?.ok().map(|c| c.as_ref().to_vec())
}

/// A certificate authority for a cluster: `ferryctl certs` and the test harnesses use it.
pub struct ClusterCa {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

/// A certificate and its key, PEM.
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (keep it secret).
    pub key_pem: String,
}

fn gen_err(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2035, 1, 1);
    params
}

impl ClusterCa {
    /// A new CA with a fresh key.
    pub fn generate() -> Result<Self, TlsError> {
        let params = ca_params();
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert_pem = params.self_signed(&key).map_err(gen_err)?.pem();
        Ok(ClusterCa { params, key, cert_pem })
    }

    /// The CA `ferryctl certs` wrote to `dir` (`ca.pem`, `ca.key`), to issue more certificates.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let key_path = dir.join("ca.key");
        let key_pem = String::from_utf8_lossy(&read(&key_path, "CA key")?).into_owned();
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Invalid {
            what: "CA key",
            path: key_path.display().to_string(),
            reason: e.to_string(),
        })?;
        let cert_pem = String::from_utf8_lossy(&read(&dir.join("ca.pem"), "CA certificate")?).into_owned();
        // Certificates are issued under the CA's name and key; both are recreated exactly.
        Ok(ClusterCa { params: ca_params(), key, cert_pem })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A node certificate naming `<node>.node.ferry`, plus `extra_sans` (DNS names or IPs) so
    /// generic tools such as grpcurl can verify it by address.
    pub fn issue_node(&self, node: &NodeId, extra_sans: &[String]) -> Result<IssuedCert, TlsError> {
        let name = node_server_name(node);
        let mut sans = vec![name.clone()];
        sans.extend(extra_sans.iter().cloned());
        self.issue(&name, sans, vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth])
    }

    /// A client certificate naming `<name>.client.ferry`.
    pub fn issue_client(&self, name: &str) -> Result<IssuedCert, TlsError> {
        NodeId::new(name).map_err(|e| TlsError::Generate(format!("client name: {e}")))?;
        let full = format!("{name}{CLIENT_SUFFIX}");
        self.issue(&full, vec![full.clone()], vec![ExtendedKeyUsagePurpose::ClientAuth])
    }

    /// An operator certificate naming `<name>.operator.ferry`.
    pub fn issue_operator(&self, name: &str) -> Result<IssuedCert, TlsError> {
        NodeId::new(name).map_err(|e| TlsError::Generate(format!("operator name: {e}")))?;
        let full = format!("{name}{OPERATOR_SUFFIX}");
        self.issue(&full, vec![full.clone()], vec![ExtendedKeyUsagePurpose::ClientAuth])
    }

    /// A server certificate for etcd, naming `sans` (its DNS names and IP addresses) and no
    /// Ferry identity, so it authenticates etcd to Ferry and grants nothing in Ferry's services.
    /// It also serves etcd's peer connections.
    pub fn issue_etcd_server(&self, sans: &[String]) -> Result<IssuedCert, TlsError> {
        if sans.is_empty() {
            return Err(TlsError::Generate("an etcd server certificate needs at least one name or address".into()));
        }
        self.issue(
            "etcd",
            sans.to_vec(),
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        )
    }

    fn issue(
        &self,
        common_name: &str,
        sans: Vec<String>,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<IssuedCert, TlsError> {
        let mut params = CertificateParams::new(sans).map_err(gen_err)?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = usages;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2035, 1, 1);
        let key = KeyPair::generate().map_err(gen_err)?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Writes `ca.pem` and `ca.key` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        write_file(&dir.join("ca.pem"), self.cert_pem.as_bytes(), false)?;
        write_file(&dir.join("ca.key"), self.key_pem().as_bytes(), true)
    }
}

impl IssuedCert {
    /// Writes `<name>.pem` and `<name>.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(), TlsError> {
        write_file(&dir.join(format!("{name}.pem")), self.cert_pem.as_bytes(), false)?;
        write_file(&dir.join(format!("{name}.key")), self.key_pem.as_bytes(), true)
    }
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::Write { path: path.display().to_string(), source };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    crate::crypto::write_new_file(path, bytes, secret).map_err(err)
}

/// Installs ring as the process's rustls provider. Every binary calls this first; a second
/// call is a no-op.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A CA plus certificates for `nodes`, one operator, one application client and a loopback
/// etcd server (`etcd.pem`), written under `dir` (test harnesses and the local cluster).
pub fn write_dev_pki(dir: &Path, nodes: &[NodeId], operator: &str, client: &str) -> Result<(), TlsError> {
    let ca = ClusterCa::generate()?;
    ca.write(dir)?;
    let loopback = ["localhost".to_string(), "127.0.0.1".to_string()];
    ca.issue_etcd_server(&loopback)?.write(dir, "etcd")?;
    for node in nodes {
        ca.issue_node(node, &loopback)?.write(dir, node.as_str())?;
    }
    ca.issue_operator(operator)?.write(dir, operator)?;
    ca.issue_client(client)?.write(dir, client)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn issued_certificates_name_one_identity() {
        let ca = ClusterCa::generate().unwrap();
        let node = NodeId::new("node-3").unwrap();
        let cert = ca.issue_node(&node, &["*.peers.example".into(), "127.0.0.1".into()]).unwrap();
        let der = first_pem_der(cert.cert_pem.as_bytes()).unwrap();
        assert_eq!(identity_of(&der).unwrap(), PeerIdentity::Node(node));
        let client = ca.issue_client("ops").unwrap();
        let der = first_pem_der(client.cert_pem.as_bytes()).unwrap();
        assert_eq!(identity_of(&der).unwrap(), PeerIdentity::Client("ops".into()));
    }

    fn common_name(pem: &str) -> String {
        let der = first_pem_der(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        cert.subject().iter_common_name().next().unwrap().as_str().unwrap().to_string()
    }

    #[test]
    fn common_names_are_full_role_qualified_names_and_etcd_gets_no_identity() {
        // etcd takes the common name as the user: a client called like a node must not be it.
        let ca = ClusterCa::generate().unwrap();
        let node = NodeId::new("node-0").unwrap();
        assert_eq!(common_name(&ca.issue_node(&node, &[]).unwrap().cert_pem), "node-0.node.ferry");
        assert_eq!(common_name(&ca.issue_client("node-0").unwrap().cert_pem), "node-0.client.ferry");
        assert_eq!(common_name(&ca.issue_operator("node-0").unwrap().cert_pem), "node-0.operator.ferry");
        for identity in [PeerIdentity::Node(node), PeerIdentity::Client("a".into()), PeerIdentity::Operator("b".into())]
        {
            let issued = match &identity {
                PeerIdentity::Node(id) => ca.issue_node(id, &[]),
                PeerIdentity::Client(name) => ca.issue_client(name),
                PeerIdentity::Operator(name) => ca.issue_operator(name),
            }
            .unwrap();
            assert_eq!(common_name(&issued.cert_pem), identity.full_name());
        }
        let etcd = ca.issue_etcd_server(&["127.0.0.1".into(), "etcd.ferry.svc".into()]).unwrap();
        assert!(identity_of(&first_pem_der(etcd.cert_pem.as_bytes()).unwrap()).is_err());
        assert!(ca.issue_etcd_server(&[]).is_err());
    }

    #[test]
    fn wildcards_and_ambiguous_names_grant_nothing() {
        let ca = ClusterCa::generate().unwrap();
        let wild = ca.issue("x", vec!["*.node.ferry".into()], vec![]).unwrap();
        assert!(identity_of(&first_pem_der(wild.cert_pem.as_bytes()).unwrap()).is_err());
        let two = ca.issue("x", vec!["a.node.ferry".into(), "b.node.ferry".into()], vec![]).unwrap();
        assert!(identity_of(&first_pem_der(two.cert_pem.as_bytes()).unwrap()).unwrap_err().contains("more than one"));
    }

    #[test]
    fn load_checks_the_certificate_names_this_node() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = [NodeId::new("node-0").unwrap(), NodeId::new("node-1").unwrap()];
        write_dev_pki(dir.path(), &nodes, "ferryctl", "app").unwrap();
        let config = TlsConfig::from_dir(dir.path(), "node-0");
        assert!(config.load(Some(&nodes[0])).unwrap().is_some());
        let err = config.load(Some(&nodes[1])).unwrap_err().to_string();
        assert!(err.contains("FERRY-TLS-002") && err.contains("node-1.node.ferry"), "{err}");
        assert!(TlsConfig::plaintext().load(None).unwrap().is_none());
        let missing = TlsConfig::from_dir(&dir.path().join("nope"), "node-0").load(None).unwrap_err().to_string();
        assert!(missing.contains("FERRY-TLS-001"), "{missing}");
    }

    #[test]
    fn a_reloaded_ca_issues_certificates_the_original_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate().unwrap();
        ca.write(dir.path()).unwrap();
        let again = ClusterCa::load(dir.path()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        let issued = again.issue_node(&NodeId::new("node-9").unwrap(), &[]).unwrap();
        // Chain verification with webpki against the original CA certificate.
        let ca_der = first_pem_der(ca.cert_pem().as_bytes()).unwrap();
        let leaf_der = first_pem_der(issued.cert_pem.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from(ca_der)).unwrap();
        install_crypto_provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().unwrap();
        let now = rustls::pki_types::UnixTime::now();
        verifier.verify_client_cert(&rustls::pki_types::CertificateDer::from(leaf_der), &[], now).unwrap();
    }
}
