//! Who may call which method, and how large its request may be, decided from the caller's
//! verified certificate and the request path in a tower layer, before tonic reads the body.
//!
//! tonic decodes a whole request before a handler runs, so a check in the handler comes after
//! the memory is spent: an unauthenticated caller could make the node decode 64 MiB of repeated
//! empty entries. [`AuthzLayer`] refuses unknown methods and unauthorised callers from the
//! headers alone, and caps each method's body at its own limit while it is read. Each service
//! declares its methods once, in a [`MethodTable`]; the metrics layer labels by the same table.

use std::{
    collections::HashMap,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt};
use http_body_util::Limited;
use tonic::{
    Status,
    body::Body,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};

use crate::{
    tls::{self, PeerIdentity},
    types::NodeId,
};

/// Who may make a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, also without a certificate: health and reflection.
    Public,
    /// Any identity the cluster CA issued (node, client or operator): cheap read-only calls.
    Authenticated,
    /// A committee member of the epoch this node is in, an application client or an operator.
    MemberOrClient,
    /// Any node; the handler checks what it asks for (a shard stream: the shard's new owner).
    AnyNode,
    /// This node's own certificate: calls between its two services.
    SelfOnly,
    /// This node or an operator: calls that change how the node works.
    SelfOrOperator,
}

/// One method of a service.
#[derive(Debug, Clone, Copy)]
pub struct MethodRule {
    /// The gRPC path, `/<package>.<Service>/<Method>`.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
    /// Largest request body, in bytes of the wire encoding (all messages of a stream together).
    pub max_request_bytes: usize,
}

/// Request limit of methods whose requests carry ids and small fields only.
pub const SMALL_REQUEST_BYTES: usize = 64 * 1024;
/// Request limit of methods whose requests carry up to 1,024 ids or certificates.
pub const ID_LIST_REQUEST_BYTES: usize = 1024 * 1024;

/// The methods of one server.
#[derive(Debug, Clone)]
pub struct MethodTable {
    by_path: HashMap<&'static str, MethodRule>,
}

impl MethodTable {
    /// A table of `rules`, plus health and reflection (public, small requests).
    pub fn new(rules: impl IntoIterator<Item = MethodRule>) -> Self {
        let by_path = health_and_reflection().into_iter().chain(rules).map(|r| (r.path, r)).collect();
        MethodTable { by_path }
    }

    /// Only health and reflection: the plaintext health port.
    pub fn health_only() -> Self {
        MethodTable::new([])
    }

    /// The rule of `path`, if it is one of this server's methods.
    pub fn rule(&self, path: &str) -> Option<&MethodRule> {
        self.by_path.get(path)
    }

    /// A metric label for `path`: the method itself if known, else `"unknown"`, so that random
    /// paths cannot grow the metrics registry.
    pub fn label(&self, path: &str) -> &'static str {
        self.rule(path).map_or("unknown", |r| r.path)
    }

    /// Every method path.
    pub fn paths(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.by_path.keys().copied()
    }

    /// How the table differs from the `services` (full names, e.g. `ferry.v1.SyncService`) of
    /// an encoded `FileDescriptorSet`: methods without a rule, then rules without a method.
    /// Empty when they match; each service's tests assert that.
    pub fn mismatches(&self, descriptor_set: &[u8], services: &[&str]) -> Result<Vec<String>, prost::DecodeError> {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(descriptor_set)?;
        let mut declared = std::collections::BTreeSet::new();
        for file in &set.file {
            for service in &file.service {
                let full = format!("{}.{}", file.package(), service.name());
                if services.contains(&full.as_str()) {
                    declared.extend(service.method.iter().map(|m| format!("/{full}/{}", m.name())));
                }
            }
        }
        let ours: std::collections::BTreeSet<String> = self
            .paths()
            .filter(|p| services.iter().any(|s| p.starts_with(&format!("/{s}/"))))
            .map(str::to_string)
            .collect();
        let missing = declared.difference(&ours).map(|p| format!("no rule for {p}"));
        let extra = ours.difference(&declared).map(|p| format!("a rule for {p}, which is no method"));
        Ok(missing.chain(extra).collect())
    }

    /// The largest request limit of any method (tonic's per-message decoding limit).
    pub fn max_request_bytes(&self) -> usize {
        self.by_path.values().map(|r| r.max_request_bytes).max().unwrap_or(SMALL_REQUEST_BYTES)
    }
}

fn health_and_reflection() -> Vec<MethodRule> {
    [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    .into_iter()
    .map(|path| MethodRule { path, access: Access::Public, max_request_bytes: SMALL_REQUEST_BYTES })
    .collect()
}

/// What the layer needs to know about the committee.
pub trait Membership: Send + Sync + 'static {
    /// This node.
    fn me(&self) -> &NodeId;
    /// Whether `node` is a member of the committee of the epoch this node is in.
    fn is_member(&self, node: &NodeId) -> bool;
}

/// Membership for a server that grants nothing by committee (recovery-service).
pub struct NoCommittee(pub NodeId);

impl Membership for NoCommittee {
    fn me(&self) -> &NodeId {
        &self.0
    }
    fn is_member(&self, _node: &NodeId) -> bool {
        false
    }
}

/// Whether `caller` may make a call with `access` on the node `membership` describes.
pub fn decide(access: Access, caller: Option<&PeerIdentity>, membership: &dyn Membership) -> Result<(), Status> {
    if access == Access::Public {
        return Ok(());
    }
    let Some(caller) = caller else {
        return Err(Status::unauthenticated("this call needs a client certificate issued by the cluster CA"));
    };
    let me = membership.me();
    let allowed = match (access, caller) {
        (Access::Public | Access::Authenticated, _) => true,
        (Access::MemberOrClient, PeerIdentity::Client(_) | PeerIdentity::Operator(_)) => true,
        (Access::MemberOrClient, PeerIdentity::Node(id)) => id == me || membership.is_member(id),
        (Access::AnyNode, PeerIdentity::Node(_)) => true,
        (Access::SelfOnly | Access::SelfOrOperator, PeerIdentity::Node(id)) => id == me,
        (Access::SelfOrOperator, PeerIdentity::Operator(_)) => true,
        (Access::AnyNode | Access::SelfOnly, PeerIdentity::Client(_) | PeerIdentity::Operator(_))
        | (Access::SelfOrOperator, PeerIdentity::Client(_)) => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(Status::permission_denied(format!("{caller} may not make this call on node {me}")))
    }
}

/// The caller the layer verified, in the request's extensions for handlers that need more
/// than the table (a shard stream's owner check). `None` on a plaintext server.
#[derive(Debug, Clone)]
pub struct VerifiedCaller(pub Option<PeerIdentity>);

/// The verified caller of a request that passed [`AuthzLayer`].
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&PeerIdentity> {
    request.extensions().get::<VerifiedCaller>().and_then(|c| c.0.as_ref())
}

/// How a server authenticates its callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authentication {
    /// Mutual TLS: every call but public ones needs a certificate, checked against the table.
    ClientCertificates,
    /// Plaintext (loopback or an explicit insecure setting): nobody is authenticated, every
    /// method is open; size limits still apply.
    None,
}

struct Policy {
    table: Arc<MethodTable>,
    membership: Arc<dyn Membership>,
    authentication: Authentication,
}

/// The tower layer for `tonic::transport::Server::layer`.
#[derive(Clone)]
pub struct AuthzLayer {
    policy: Arc<Policy>,
}

impl AuthzLayer {
    /// Enforces `table` for the node `membership` describes.
    pub fn new(table: Arc<MethodTable>, membership: Arc<dyn Membership>, authentication: Authentication) -> Self {
        AuthzLayer { policy: Arc::new(Policy { table, membership, authentication }) }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthzService { inner, policy: self.policy.clone() }
    }
}

/// See [`AuthzLayer`].
#[derive(Clone)]
pub struct AuthzService<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S> AuthzService<S> {
    fn check(&self, request: &http::Request<Body>) -> Result<(MethodRule, Option<PeerIdentity>), Status> {
        let path = request.uri().path();
        let rule = *self.policy.table.rule(path).ok_or_else(|| Status::unimplemented("no such method"))?;
        if self.policy.authentication == Authentication::None {
            return Ok((rule, None));
        }
        let caller = peer_identity(request)?;
        decide(rule.access, caller.as_ref(), self.policy.membership.as_ref())?;
        Ok((rule, caller))
    }
}

/// The identity in the caller's verified client certificate, if it sent one.
pub(crate) fn peer_identity<B>(request: &http::Request<B>) -> Result<Option<PeerIdentity>, Status> {
    let certs = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|info| info.peer_certs());
    let Some(leaf) = certs.as_ref().and_then(|c| c.first().cloned()) else { return Ok(None) };
    tls::identity_of(leaf.as_ref()).map(Some).map_err(|e| Status::unauthenticated(format!("client certificate {e}")))
}

/// Whether a request's own trace context may be continued: on a TLS connection only when the
/// caller proved a Ferry identity with its certificate, so an anonymous caller cannot attach
/// its spans to a node's traces or make the node's spans look sampled. A plaintext server
/// (loopback only, unless the operator accepted the risk) trusts every caller alike.
pub(crate) fn may_continue_trace<B>(request: &http::Request<B>) -> bool {
    if request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().is_none() {
        return true;
    }
    matches!(peer_identity(request), Ok(Some(_)))
}

impl<S, ResBody> tower::Service<http::Request<Body>> for AuthzService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match self.check(&request) {
            Err(status) => {
                let response = status.into_http();
                async move { Ok(response) }.boxed()
            }
            Ok((rule, caller)) => {
                request.extensions_mut().insert(VerifiedCaller(caller));
                let request = request.map(|body| Body::new(Limited::new(body, rule.max_request_bytes)));
                self.inner.call(request).boxed()
            }
        }
    }
}

/// A `Status` for a failure inside the node: the details (paths, store errors) go to the log
/// under a reference, the caller gets only the reference.
pub fn internal_error(error: impl std::fmt::Display) -> Status {
    let reference = format!("{:016x}", rand::random::<u64>());
    tracing::error!(%reference, error = %error, "request failed inside the node");
    Status::internal(format!("internal error; the node's log has the details under reference {reference}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct Committee {
        me: NodeId,
        members: Vec<NodeId>,
    }

    impl Membership for Committee {
        fn me(&self) -> &NodeId {
            &self.me
        }
        fn is_member(&self, node: &NodeId) -> bool {
            self.members.contains(node)
        }
    }

    fn node(id: &str) -> PeerIdentity {
        PeerIdentity::Node(NodeId::new(id).unwrap())
    }

    #[test]
    fn each_access_admits_exactly_its_callers() {
        let committee = Committee {
            me: NodeId::new("node-0").unwrap(),
            members: vec![NodeId::new("node-0").unwrap(), NodeId::new("node-1").unwrap()],
        };
        let me = node("node-0");
        let member = node("node-1");
        let stranger = node("node-9");
        let client = PeerIdentity::Client("app".into());
        let operator = PeerIdentity::Operator("ops".into());
        // Columns: nobody, me, member, stranger (not in the committee), client, operator.
        let callers = [None, Some(&me), Some(&member), Some(&stranger), Some(&client), Some(&operator)];
        let table = [
            (Access::Public, [true, true, true, true, true, true]),
            (Access::Authenticated, [false, true, true, true, true, true]),
            (Access::MemberOrClient, [false, true, true, false, true, true]),
            (Access::AnyNode, [false, true, true, true, false, false]),
            (Access::SelfOnly, [false, true, false, false, false, false]),
            (Access::SelfOrOperator, [false, true, false, false, false, true]),
        ];
        for (access, expected) in table {
            for (caller, allowed) in callers.iter().zip(expected) {
                let got = decide(access, *caller, &committee);
                assert_eq!(got.is_ok(), allowed, "{access:?} for {caller:?}: {got:?}");
                if let Err(status) = got {
                    let code =
                        if caller.is_none() { tonic::Code::Unauthenticated } else { tonic::Code::PermissionDenied };
                    assert_eq!(status.code(), code, "{access:?} for {caller:?}");
                }
            }
        }
    }

    #[test]
    fn unknown_paths_share_one_metric_label() {
        let table = MethodTable::new([MethodRule {
            path: "/ferry.v1.Test/Call",
            access: Access::Authenticated,
            max_request_bytes: 10,
        }]);
        assert_eq!(table.label("/ferry.v1.Test/Call"), "/ferry.v1.Test/Call");
        let labels: std::collections::HashSet<_> = (0..1000).map(|i| table.label(&format!("/x{i}/y"))).collect();
        assert_eq!(labels.into_iter().collect::<Vec<_>>(), vec!["unknown"]);
        assert_eq!(table.label("/grpc.health.v1.Health/Check"), "/grpc.health.v1.Health/Check");
    }
}
