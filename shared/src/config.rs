//! Layered configuration: compiled-in defaults, then a TOML file, then environment variables.
//!
//! An environment variable `<PREFIX>__SECTION__KEY=value` overrides `[section] key` (the
//! double underscore separates levels, so `FERRY_SYNC_CONFIG`, which names the file, is never
//! mistaken for a setting). Values are parsed as TOML scalars when they can be (`42`, `true`,
//! `1.5`), as strings otherwise; lists use TOML syntax (`["a", "b"]`). Unknown keys are errors,
//! and [`Validate`] checks what types cannot, naming the bad field.

use std::path::Path;

use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("FERRY-CONFIG-001: cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file, or the file with the environment overrides, does not parse into the config.
    #[error("FERRY-CONFIG-002: invalid configuration ({origin}): {message}")]
    Parse {
        /// Where the bad value came from.
        origin: String,
        /// The parser's message, which names the field.
        message: String,
    },
    /// A value is of the right type but not allowed.
    #[error("FERRY-CONFIG-003: invalid value for `{field}`: {reason}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// Why it is not allowed.
        reason: String,
    },
}

/// Where the control plane (etcd) is; shared by every Ferry binary.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// etcd endpoints: `https://host:port` (mutual TLS with this party's certificate, whose
    /// common name etcd takes as the user for its RBAC) or `http://host:port`.
    pub etcd_endpoints: Vec<String>,
    /// Cluster name: keys live under `/ferry/<cluster>/`.
    pub cluster: String,
    /// `http://` endpoints are allowed only on loopback unless this is set: plaintext etcd
    /// authenticates nobody, so anyone who reaches it can rewrite committees and phases.
    /// Default false.
    pub insecure_plaintext_beyond_loopback: bool,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            cluster: "ferry".into(),
            insecure_plaintext_beyond_loopback: false,
        }
    }
}

impl ControlPlaneConfig {
    /// Whether the endpoints use TLS (all `https://`); mixed schemes fail validation.
    pub fn uses_tls(&self) -> bool {
        self.etcd_endpoints.iter().all(|e| e.starts_with("https://"))
    }

    /// `https://` endpoints need a certificate to present: refused when this party has none.
    pub fn check_identity(&self, has_certificate: bool) -> Result<(), ConfigError> {
        if self.uses_tls() && !has_certificate {
            return Err(invalid(
                "control_plane.etcd_endpoints",
                "https:// etcd authenticates this node by its certificate, but tls.enabled = false",
            ));
        }
        Ok(())
    }
}

impl Validate for ControlPlaneConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.etcd_endpoints.is_empty() {
            return Err(invalid("control_plane.etcd_endpoints", "at least one etcd endpoint is needed"));
        }
        if self.cluster.is_empty() || self.cluster.contains('/') {
            return Err(invalid("control_plane.cluster", "must be non-empty and contain no '/'"));
        }
        let mut schemes = std::collections::BTreeSet::new();
        for endpoint in &self.etcd_endpoints {
            let uri: http::Uri = endpoint
                .parse()
                .map_err(|e| invalid("control_plane.etcd_endpoints", format!("{endpoint:?} is not a URL: {e}")))?;
            let scheme = uri.scheme_str().unwrap_or_default();
            let host = uri.host().unwrap_or_default();
            match scheme {
                "https" => {}
                "http" if is_loopback_host(host) || self.insecure_plaintext_beyond_loopback => {}
                "http" => {
                    return Err(invalid(
                        "control_plane.etcd_endpoints",
                        format!(
                            "{endpoint} is plaintext beyond loopback: anyone who reaches it could rewrite committees \
                             and phases; use https://, or set control_plane.insecure_plaintext_beyond_loopback = true \
                             to accept that risk"
                        ),
                    ));
                }
                _ => {
                    return Err(invalid(
                        "control_plane.etcd_endpoints",
                        format!("{endpoint:?} must start with https:// or http://"),
                    ));
                }
            }
            schemes.insert(scheme.to_string());
        }
        if schemes.len() > 1 {
            return Err(invalid("control_plane.etcd_endpoints", "mixes https:// and http:// endpoints"));
        }
        Ok(())
    }
}

/// `localhost` or a loopback address (brackets of an IPv6 host included).
fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost" || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks of a configuration beyond its types.
pub trait Validate {
    /// Returns the first invalid field, if any.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Shorthand for a [`ConfigError::Invalid`].
pub fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.to_string(), reason: reason.into() }
}

/// Loads `T` from its defaults, the optional TOML file and the environment variables that
/// start with `env_prefix` followed by `__`, then validates it.
pub fn load<T>(file: Option<&Path>, env_prefix: &str) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default + Validate,
{
    load_from(file, env_prefix, std::env::vars())
}

/// [`load`] with an explicit environment, for tests.
pub fn load_from<T>(
    file: Option<&Path>,
    env_prefix: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default + Validate,
{
    let (mut table, origin) = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
            let table: toml::Table = toml::from_str(&text)
                .map_err(|e| ConfigError::Parse { origin: path.display().to_string(), message: e.to_string() })?;
            (table, path.display().to_string())
        }
        None => (toml::Table::new(), "defaults".to_string()),
    };
    let marker = format!("{env_prefix}__");
    let mut overridden = Vec::new();
    let mut vars: Vec<(String, String)> = vars.into_iter().filter(|(k, _)| k.starts_with(&marker)).collect();
    vars.sort();
    for (name, value) in vars {
        let path: Vec<String> = name[marker.len()..].split("__").map(str::to_ascii_lowercase).collect();
        set_path(&mut table, &path, parse_scalar(&value))
            .map_err(|message| ConfigError::Parse { origin: format!("environment variable {name}"), message })?;
        overridden.push(name);
    }
    let origin = if overridden.is_empty() { origin } else { format!("{origin} with {}", overridden.join(", ")) };
    // Round-trip through text so the parser's error names the field and its location.
    let text =
        toml::to_string(&table).map_err(|e| ConfigError::Parse { origin: origin.clone(), message: e.to_string() })?;
    let config: T = toml::from_str(&text).map_err(|e| ConfigError::Parse { origin, message: e.to_string() })?;
    config.validate()?;
    Ok(config)
}

fn parse_scalar(raw: &str) -> toml::Value {
    // Anything that parses as a TOML value is taken as one; the rest is a plain string.
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Err("empty setting name".into()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = table.entry(first.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(inner) => set_path(inner, rest, value),
                _ => Err(format!("`{first}` is a value, not a section")),
            }
        }
    }
}

/// Renders a config as TOML (for `--print-config` and documentation).
pub fn to_toml<T: Serialize>(config: &T) -> Result<String, ConfigError> {
    toml::to_string_pretty(config)
        .map_err(|e| ConfigError::Parse { origin: "serialise".into(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        workers: u32,
        name: String,
    }
    impl Default for Inner {
        fn default() -> Self {
            Inner { workers: 4, name: "x".into() }
        }
    }
    #[derive(Debug, Serialize, Deserialize, PartialEq, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Top {
        inner: Inner,
        peers: Vec<String>,
    }
    impl Validate for Top {
        fn validate(&self) -> Result<(), ConfigError> {
            if self.inner.workers == 0 {
                return Err(invalid("inner.workers", "must be at least 1"));
            }
            Ok(())
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[inner]\nworkers = 8\n").unwrap();
        let c: Top = load_from(
            Some(&path),
            "T",
            env(&[("T__INNER__NAME", "node-1"), ("T_CONFIG", "ignored"), ("T__PEERS", "[\"a\", \"b\"]")]),
        )
        .unwrap();
        assert_eq!(c, Top { inner: Inner { workers: 8, name: "node-1".into() }, peers: vec!["a".into(), "b".into()] });
        let c: Top = load_from(Some(&path), "T", env(&[("T__INNER__WORKERS", "2")])).unwrap();
        assert_eq!(c.inner.workers, 2);
        let d: Top = load_from(None, "T", Vec::new()).unwrap();
        assert_eq!(d, Top::default());
    }

    #[test]
    fn errors_name_the_bad_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[inner]\nwrokers = 8\n").unwrap();
        let err = load_from::<Top>(Some(&path), "T", Vec::new()).unwrap_err().to_string();
        assert!(err.contains("wrokers"), "{err}");
        let err = load_from::<Top>(None, "T", env(&[("T__INNER__WORKERS", "many")])).unwrap_err().to_string();
        assert!(err.contains("workers") && err.contains("T__INNER__WORKERS"), "{err}");
        let err = load_from::<Top>(None, "T", env(&[("T__INNER__WORKERS", "0")])).unwrap_err().to_string();
        assert!(err.contains("inner.workers"), "{err}");
        let err = load_from::<Top>(Some(&dir.path().join("missing.toml")), "T", Vec::new()).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
    }

    #[test]
    fn etcd_plaintext_stays_on_loopback_unless_the_risk_is_named() {
        let config = |endpoints: &[&str], insecure: bool| ControlPlaneConfig {
            etcd_endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            insecure_plaintext_beyond_loopback: insecure,
            ..ControlPlaneConfig::default()
        };
        for ok in [
            &["http://127.0.0.1:2379"][..],
            &["http://localhost:2379"],
            &["http://[::1]:2379"],
            &["https://etcd-0.example:2379", "https://10.0.0.2:2379"],
        ] {
            config(ok, false).validate().unwrap();
        }
        let err = config(&["http://etcd:2379"], false).validate().unwrap_err().to_string();
        assert!(
            err.contains("control_plane.etcd_endpoints") && err.contains("insecure_plaintext_beyond_loopback"),
            "{err}"
        );
        config(&["http://etcd:2379"], true).validate().unwrap();
        let err = config(&["https://a:2379", "http://127.0.0.1:2379"], false).validate().unwrap_err().to_string();
        assert!(err.contains("mixes"), "{err}");
        assert!(config(&["etcd:2379"], false).validate().is_err());
        assert!(config(&["https://a:2379"], false).uses_tls() && !config(&["http://127.0.0.1:1"], false).uses_tls());
    }
}
