//! Who may read and write which of a cluster's keys in etcd, enforced by etcd's own RBAC.
//!
//! etcd started with `--client-cert-auth` takes the common name of a verified client
//! certificate as the user of the request. Ferry's certificates carry the full,
//! role-qualified name ([`PeerIdentity::full_name`], e.g. `node-0.node.ferry`), so each party
//! is one etcd user holding the roles of its kind:
//!
//! | party | reads | writes |
//! |---|---|---|
//! | node | the cluster's prefix | `current` (the flip to `Done` at a quorum), `attestations/`, its own `nodes/<id>` |
//! | application client | the cluster's prefix | nothing |
//! | operator | the cluster's prefix | the cluster's prefix; etcd's `root` role, to manage users |
//!
//! A node may write under another node's attestation key (etcd ranges cannot express "any
//! epoch, this node", since the epoch comes first in the key), but attestations are signed
//! with the node's key and verified by every reader, so it forges nothing. What [`plan`]
//! decides is pure and table-tested; [`apply`] carries it out, idempotently.
//!
//! [`revoke`] takes a party's access away again (a node that left the cluster, a client
//! certificate that leaked): its etcd user goes, so etcd refuses its certificate, whatever
//! the certificate's expiry. [`may_revoke`] decides when that is safe.

use etcd_client::Permission;
use rand::RngCore;

use super::{
    ControlPlane, ControlPlaneError, EpochPhase, Result,
    etcd::{connect_client, request_error},
};
use crate::{
    Committee,
    tls::{PeerIdentity, TlsMaterial},
};

/// etcd's built-in role with every permission, user management included.
const ROOT: &str = "root";
/// What etcd says when adding what exists, or deleting what does not.
const EXISTS: &str = "already exists";
const MISSING: &str = "not found";

/// Which keys a grant covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys {
    /// One key.
    Exact(String),
    /// Every key that starts with this.
    Prefix(String),
}

/// What a grant allows on its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Get, range and watch.
    Read,
    /// Put and delete (transactions need it for every key they write).
    Write,
    /// Both.
    ReadWrite,
}

/// An etcd role and the permissions it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleGrants {
    /// The role's name.
    pub role: String,
    /// Its permissions (none for etcd's built-in `root`).
    pub grants: Vec<(Keys, Access)>,
}

/// The roles `party` holds in `cluster` (keys under `/ferry/<cluster>/`).
pub fn plan(cluster: &str, party: &PeerIdentity) -> Vec<RoleGrants> {
    let prefix = ControlPlane::cluster_prefix(cluster);
    let read_all = (Keys::Prefix(prefix.clone()), Access::Read);
    match party {
        PeerIdentity::Node(id) => vec![
            RoleGrants {
                role: format!("ferry.{cluster}.node"),
                grants: vec![
                    read_all,
                    (Keys::Exact(format!("{prefix}current")), Access::Write),
                    (Keys::Prefix(format!("{prefix}attestations/")), Access::Write),
                ],
            },
            RoleGrants {
                role: format!("ferry.{cluster}.node.{id}"),
                grants: vec![(Keys::Exact(format!("{prefix}nodes/{id}")), Access::Write)],
            },
        ],
        PeerIdentity::Client(_) => vec![RoleGrants { role: format!("ferry.{cluster}.client"), grants: vec![read_all] }],
        PeerIdentity::Operator(_) => vec![
            RoleGrants {
                role: format!("ferry.{cluster}.operator"),
                grants: vec![(Keys::Prefix(prefix), Access::ReadWrite)],
            },
            RoleGrants { role: ROOT.to_string(), grants: Vec::new() },
        ],
    }
}

/// What [`apply`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AccessReport {
    /// Users created by this call (existing ones are left as they are).
    pub users_created: Vec<String>,
}

/// Creates the roles and users of `parties` in `cluster`, then turns etcd's authentication
/// on. Idempotent: existing roles, grants and users stay, so the operator runs it again to
/// add a party. Connects with `operator`'s certificate: before authentication is on any
/// certificate from the cluster CA may do this; afterwards only a user with the `root` role,
/// which every operator holds. Users get a random password nobody keeps: they authenticate
/// with their certificate, never with a password.
pub async fn apply(
    endpoints: &[String],
    operator: &TlsMaterial,
    cluster: &str,
    parties: &[PeerIdentity],
) -> Result<AccessReport> {
    let joined = endpoints.join(",");
    let mut client = connect_client(endpoints, Some(operator)).await?;
    let mut report = AccessReport::default();
    let mut everyone = parties.to_vec();
    if !everyone.contains(operator.own_identity()) {
        everyone.push(operator.own_identity().clone());
    }
    // etcd enables authentication only once a `root` user holds the `root` role.
    let root = vec![RoleGrants { role: ROOT.to_string(), grants: Vec::new() }];
    let mut users: Vec<(String, Vec<RoleGrants>)> = vec![(ROOT.to_string(), root)];
    users.extend(everyone.iter().map(|party| (party.full_name(), plan(cluster, party))));
    for (user, roles) in &users {
        for role in roles {
            if role.role != ROOT {
                done_or_unchanged(client.role_add(role.role.as_str()).await, EXISTS, &joined, "role add")?;
            }
            for (keys, access) in &role.grants {
                let permission = permission(keys, *access);
                check(client.role_grant_permission(role.role.as_str(), permission).await, &joined, "role grant")?;
            }
        }
        if done_or_unchanged(
            client.user_add(user.as_str(), random_password(), None).await,
            EXISTS,
            &joined,
            "user add",
        )? {
            report.users_created.push(user.clone());
        }
        for role in roles {
            check(client.user_grant_role(user.as_str(), role.role.as_str()).await, &joined, "user grant")?;
        }
    }
    // etcd answers success when authentication is on already.
    check(client.auth_enable().await, &joined, "auth enable")?;
    Ok(report)
}

/// Whether `party`'s access may be revoked by `operator` while the cluster is in `phase` with
/// `committee` (the committee of that phase's epoch). A node only once no epoch needs it: not
/// a member, and no epoch change running, since a node that leaves still serves its shards to
/// their new owners until the change is done, and reads the committees to do so. Never the
/// operator running it.
pub fn may_revoke(
    party: &PeerIdentity,
    operator: &PeerIdentity,
    phase: Option<EpochPhase>,
    committee: Option<&Committee>,
) -> std::result::Result<(), String> {
    if party == operator {
        return Err("an operator cannot revoke itself (another operator can)".into());
    }
    let PeerIdentity::Node(id) = party else { return Ok(()) };
    match phase {
        Some(EpochPhase::ChangeSync(epoch)) => {
            Err(format!("epoch {epoch} is changing; a node that leaves serves its shards until the change is done"))
        }
        _ if committee.is_some_and(|c| c.is_member(id)) => Err(format!(
            "{id} is a member of the current committee; propose one without it and let that epoch finish first"
        )),
        _ => Ok(()),
    }
}

/// What [`revoke`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RevokeReport {
    /// Users deleted by this call (parties without a user are skipped).
    pub users_deleted: Vec<String>,
}

/// Deletes the etcd users of `parties` in `cluster` (and a node's own record role), after
/// [`may_revoke`] allowed each against the current phase and committee, which it reads as
/// `operator`. Idempotent. Connections a revoked party holds open fail at their next request.
pub async fn revoke(
    endpoints: &[String],
    operator: &TlsMaterial,
    cluster: &str,
    parties: &[PeerIdentity],
) -> Result<RevokeReport> {
    let joined = endpoints.join(",");
    let control_plane = ControlPlane::connect_etcd(endpoints, cluster, Some(operator)).await?;
    let phase = control_plane.current().await?;
    let committee = control_plane.current_committee().await?;
    for party in parties {
        may_revoke(party, operator.own_identity(), phase, committee.as_ref())
            .map_err(|reason| ControlPlaneError::RevokeRefused { party: party.to_string(), reason })?;
    }
    let mut client = connect_client(endpoints, Some(operator)).await?;
    let mut report = RevokeReport::default();
    for party in parties {
        let user = party.full_name();
        if done_or_unchanged(client.user_delete(user.as_str()).await, MISSING, &joined, "user delete")? {
            report.users_deleted.push(user);
        }
        if let PeerIdentity::Node(id) = party {
            done_or_unchanged(
                client.role_delete(format!("ferry.{cluster}.node.{id}")).await,
                MISSING,
                &joined,
                "role delete",
            )?;
        }
    }
    Ok(report)
}

fn permission(keys: &Keys, access: Access) -> Permission {
    let (key, prefix) = match keys {
        Keys::Exact(key) => (key.as_str(), false),
        Keys::Prefix(key) => (key.as_str(), true),
    };
    let permission = match access {
        Access::Read => Permission::read(key),
        Access::Write => Permission::write(key),
        Access::ReadWrite => Permission::read_write(key),
    };
    if prefix { permission.with_prefix() } else { permission }
}

fn random_password() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn check<T>(result: std::result::Result<T, etcd_client::Error>, endpoints: &str, what: &str) -> Result<T> {
    result.map_err(|e| request_error(endpoints, what, e))
}

/// `Ok(true)` if the request did something, `Ok(false)` if etcd refused it only because it was
/// done already (`unchanged` is in its message: "already exists" for an add, "not found" for a
/// delete), which makes adding and removing idempotent.
fn done_or_unchanged<T>(
    result: std::result::Result<T, etcd_client::Error>,
    unchanged: &str,
    endpoints: &str,
    what: &str,
) -> Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(etcd_client::Error::GRpcStatus(status)) if status.message().contains(unchanged) => Ok(false),
        Err(e) => Err(request_error(endpoints, what, e)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::types::NodeId;

    fn writes(roles: &[RoleGrants]) -> Vec<Keys> {
        roles
            .iter()
            .flat_map(|r| r.grants.iter())
            .filter(|(_, a)| matches!(a, Access::Write | Access::ReadWrite))
            .map(|(k, _)| k.clone())
            .collect()
    }

    #[test]
    fn each_party_writes_only_what_its_role_needs() {
        let p = "/ferry/c/";
        let node = plan("c", &PeerIdentity::Node(NodeId::new("node-1").unwrap()));
        assert_eq!(
            writes(&node),
            vec![
                Keys::Exact(format!("{p}current")),
                Keys::Prefix(format!("{p}attestations/")),
                Keys::Exact(format!("{p}nodes/node-1")),
            ]
        );
        assert!(node.iter().all(|r| r.role != ROOT));
        let client = plan("c", &PeerIdentity::Client("app".into()));
        assert!(writes(&client).is_empty());
        assert_eq!(client[0].grants, vec![(Keys::Prefix(p.into()), Access::Read)]);
        let operator = plan("c", &PeerIdentity::Operator("ops".into()));
        assert_eq!(writes(&operator), vec![Keys::Prefix(p.into())]);
        assert!(operator.iter().any(|r| r.role == ROOT));
    }

    #[test]
    fn access_is_revoked_only_when_nothing_needs_it() {
        let node = |n: &str| PeerIdentity::Node(NodeId::new(n).unwrap());
        let ops = PeerIdentity::Operator("ops".into());
        let keys: Vec<_> = (0..4).map(|i| crate::crypto::NodeKeypair::from_seed([i + 1; 32])).collect();
        let members = (0..4)
            .map(|i| crate::Member::for_key(NodeId::new(format!("n{i}")).unwrap(), &keys[i], "a:1", "a:2", 1))
            .collect();
        let committee = Committee::genesis(4, members).unwrap();
        let done = Some(EpochPhase::Done(0));
        let changing = Some(EpochPhase::ChangeSync(1));
        // (what, party, phase, committee, may it be revoked)
        type Case<'a> = (&'a str, PeerIdentity, Option<EpochPhase>, Option<&'a Committee>, bool);
        let cases: Vec<Case> = vec![
            ("a member", node("n1"), done, Some(&committee), false),
            ("a former member, epoch done", node("gone"), done, Some(&committee), true),
            ("a former member while an epoch changes", node("gone"), changing, Some(&committee), false),
            ("a node of a cluster with no epoch yet", node("n1"), None, None, true),
            ("a client, even mid-change", PeerIdentity::Client("app".into()), changing, Some(&committee), true),
            ("another operator", PeerIdentity::Operator("old".into()), done, Some(&committee), true),
            ("the operator itself", ops.clone(), done, Some(&committee), false),
        ];
        for (what, party, phase, committee, allowed) in cases {
            assert_eq!(may_revoke(&party, &ops, phase, committee).is_ok(), allowed, "{what}");
        }
    }

    #[test]
    fn roles_are_per_cluster_and_node_records_per_node() {
        let a = plan("a", &PeerIdentity::Node(NodeId::new("n").unwrap()));
        let b = plan("b", &PeerIdentity::Node(NodeId::new("n").unwrap()));
        let m = plan("a", &PeerIdentity::Node(NodeId::new("m").unwrap()));
        assert!(a.iter().all(|r| !b.iter().any(|s| s.role == r.role)));
        assert_eq!(a[0], m[0], "nodes of one cluster share the node role");
        assert_ne!(a[1], m[1], "each node has its own record role");
        // A cluster named like another's prefix does not reach into it.
        assert!(plan("a", &PeerIdentity::Client("x".into()))[0].grants[0].0 == Keys::Prefix("/ferry/a/".into()));
    }
}
