//! What a follower makes of any value written under any of a cluster's keys: an epoch event,
//! nothing, or `Poisoned`, never a panic. A committee handed on as `Started` holds every
//! invariant nodes rely on (one owner per shard, owners are members, keys parse) and is stored
//! under its own epoch. Attestation records read back are checked against a real committee.
#![no_main]

use ferry_fuzz::fixture;
use ferry_shared::control_plane::{AttestationRecord, ControlPlane, EpochEvent};
use libfuzzer_sys::fuzz_target;

const KEYS: [&str; 6] = ["epochs/", "current", "attestations/", "nodes/", "", "epochs/0000000000000000000"];

// Input: `[key kind: u8][key suffix length: u8][key suffix][value]`
fuzz_target!(|data: &[u8]| {
    let Some(([kind], rest)) = ferry_fuzz::header::<1>(data) else { return };
    let Some((suffix, value)) = ferry_fuzz::field(rest) else { return };
    let control_plane = ControlPlane::in_memory("fuzz");
    let rest = KEYS[usize::from(kind) % KEYS.len()];
    let key = format!("{}{rest}{}", control_plane.prefix(), String::from_utf8_lossy(suffix));
    match control_plane.epoch_event(&key, value) {
        Some(EpochEvent::Started(committee)) => {
            committee.validate().expect("a committee that does not validate was handed on");
            let epoch = key.rsplit('/').next().and_then(|e| e.parse::<u64>().ok());
            assert_eq!(epoch, Some(committee.epoch), "a committee handed on under another epoch's key");
            for shard in 0..committee.n_shards {
                let owner = committee.owner(ferry_shared::ShardIndex(shard)).expect("every shard has an owner");
                assert!(committee.is_member(owner), "a shard owned by a non-member");
            }
        }
        Some(EpochEvent::Attested { node, .. }) => assert!(key.ends_with(node.as_str())),
        Some(EpochEvent::Done(_) | EpochEvent::Poisoned { .. }) | None => {}
    }
    // An attestation record as `ferryctl attestations` and the quorum check read it: any JSON
    // decodes or not, and none verifies against the committee without its member's key.
    if let Ok(record) = serde_json::from_slice::<AttestationRecord>(value) {
        assert!(record.verify(&fixture().committee).is_err(), "an attestation nobody signed verified");
    }
});
