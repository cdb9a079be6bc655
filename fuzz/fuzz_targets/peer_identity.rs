//! Who a peer's certificate says it is, as the authorisation layer reads it from any DER the
//! TLS handshake accepted, and the method label any request path gets: one identity or none,
//! whose full name is a well-formed Ferry name; one label for every unknown path.
#![no_main]

use ferry_shared::{authz::MethodTable, tls, types::NodeId};
use libfuzzer_sys::fuzz_target;

// Input: `[path length: u8][path][DER certificate]`
fuzz_target!(|data: &[u8]| {
    let Some((path, der)) = ferry_fuzz::field(data) else { return };
    let path = String::from_utf8_lossy(path);
    let path = path.as_ref();
    if let Ok(identity) = tls::identity_of(der) {
        let full = identity.full_name();
        let (name, role) = full.split_once('.').expect("a full name has a role");
        NodeId::new(name).expect("the name part is a valid id");
        assert!(["node.ferry", "client.ferry", "operator.ferry"].contains(&role), "{full}");
    }
    let table = MethodTable::health_only();
    let label = table.label(path);
    assert!(label == "unknown" || table.rule(path).is_some_and(|r| r.path == path));
});
