//! Conversions between openraft's types and Runnel's protobuf (`proto/raft.proto`).
//!
//! Every decoder checks presence of required fields and answers a descriptive error, never a
//! panic: these bytes come from disk and from the network.

use std::collections::{BTreeMap, BTreeSet};

use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use openraft::vote::RaftLeaderId;
use prost::Message;
use runnel_proto::raft as pb;

use crate::types::{Cmd, Entry, LeaderId, LogId, Membership, NodeAddr, StoredMembership, Vote};

/// A decoding failure: which message and what was wrong.
#[derive(Debug, thiserror::Error)]
#[error("bad {what}: {why}")]
pub struct DecodeError {
    what: &'static str,
    why: String,
}

fn missing(what: &'static str, field: &str) -> DecodeError {
    DecodeError {
        what,
        why: format!("missing {field}"),
    }
}

impl From<DecodeError> for std::io::Error {
    fn from(e: DecodeError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

pub(crate) fn leader_id_to(l: &LeaderId) -> pb::LeaderId {
    pb::LeaderId {
        term: l.term,
        node_id: l.node_id,
    }
}

/// Largest term accepted from the wire or disk: far beyond any real cluster's (an election a
/// millisecond for a hundred million years), and far enough below `u64::MAX` that no
/// `term + 1` can overflow.
pub const TERM_MAX: u64 = 1 << 62;
/// Largest log index accepted, for the same reason.
pub const INDEX_MAX: u64 = 1 << 62;

fn term_checked(what: &'static str, term: u64) -> Result<u64, DecodeError> {
    if term > TERM_MAX {
        return Err(DecodeError {
            what,
            why: format!("term {term} above the limit {TERM_MAX}"),
        });
    }
    Ok(term)
}

pub(crate) fn leader_id_from(l: &pb::LeaderId) -> Result<LeaderId, DecodeError> {
    Ok(LeaderId::new(term_checked("LeaderId", l.term)?, l.node_id))
}

pub(crate) fn log_id_to(l: &LogId) -> pb::LogId {
    pb::LogId {
        leader_id: Some(leader_id_to(&l.leader_id)),
        index: l.index,
    }
}

pub(crate) fn log_id_from(l: &pb::LogId) -> Result<LogId, DecodeError> {
    let lid = l
        .leader_id
        .as_ref()
        .ok_or_else(|| missing("LogId", "leader_id"))?;
    if l.index > INDEX_MAX {
        return Err(DecodeError {
            what: "LogId",
            why: format!("index {} above the limit {INDEX_MAX}", l.index),
        });
    }
    Ok(LogId::new(leader_id_from(lid)?, l.index))
}

pub(crate) fn opt_log_id_to(l: &Option<LogId>) -> Option<pb::LogId> {
    l.as_ref().map(log_id_to)
}

pub(crate) fn opt_log_id_from(l: &Option<pb::LogId>) -> Result<Option<LogId>, DecodeError> {
    l.as_ref().map(log_id_from).transpose()
}

pub(crate) fn vote_to(v: &Vote) -> pb::Vote {
    pb::Vote {
        leader_id: Some(leader_id_to(v.leader_id())),
        committed: v.is_committed(),
    }
}

pub(crate) fn vote_from(v: &pb::Vote) -> Result<Vote, DecodeError> {
    let l = v
        .leader_id
        .as_ref()
        .ok_or_else(|| missing("Vote", "leader_id"))?;
    let term = term_checked("Vote", l.term)?;
    Ok(if v.committed {
        Vote::new_committed(term, l.node_id)
    } else {
        Vote::new(term, l.node_id)
    })
}

pub(crate) fn membership_to(m: &Membership) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|c| pb::NodeIdSet {
                ids: c.iter().copied().collect(),
            })
            .collect(),
        nodes: m
            .nodes()
            .map(|(id, n)| {
                (
                    *id,
                    pb::Node {
                        addr: n.addr.clone(),
                        client_addr: n.client_addr.clone(),
                    },
                )
            })
            .collect(),
    }
}

pub(crate) fn membership_from(m: &pb::Membership) -> Result<Membership, DecodeError> {
    let configs: Vec<BTreeSet<u64>> = m
        .configs
        .iter()
        .map(|c| c.ids.iter().copied().collect())
        .collect();
    let nodes: BTreeMap<u64, NodeAddr> = m
        .nodes
        .iter()
        .map(|(id, n)| {
            (
                *id,
                NodeAddr {
                    addr: n.addr.clone(),
                    client_addr: n.client_addr.clone(),
                },
            )
        })
        .collect();
    Membership::new(configs, nodes).map_err(|e| DecodeError {
        what: "Membership",
        why: e.to_string(),
    })
}

pub(crate) fn stored_membership_to(m: &StoredMembership) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: opt_log_id_to(m.log_id()),
        membership: Some(membership_to(m.membership())),
    }
}

pub(crate) fn stored_membership_from(
    m: &pb::StoredMembership,
) -> Result<StoredMembership, DecodeError> {
    let mem = m
        .membership
        .as_ref()
        .ok_or_else(|| missing("StoredMembership", "membership"))?;
    Ok(StoredMembership::new(
        opt_log_id_from(&m.log_id)?,
        membership_from(mem)?,
    ))
}

pub(crate) fn entry_to(e: &Entry) -> pb::Entry {
    use pb::entry::Payload;
    let payload = match &e.payload {
        EntryPayload::Blank => Payload::Blank(pb::Blank {}),
        EntryPayload::Normal(cmd) => Payload::Command(cmd.0.clone()),
        EntryPayload::Membership(m) => Payload::Membership(membership_to(m)),
    };
    pb::Entry {
        log_id: Some(log_id_to(&e.log_id)),
        payload: Some(payload),
    }
}

pub(crate) fn entry_from(e: &pb::Entry) -> Result<Entry, DecodeError> {
    use pb::entry::Payload;
    let log_id = log_id_from(
        e.log_id
            .as_ref()
            .ok_or_else(|| missing("Entry", "log_id"))?,
    )?;
    let payload = match e
        .payload
        .as_ref()
        .ok_or_else(|| missing("Entry", "payload"))?
    {
        Payload::Blank(_) => EntryPayload::Blank,
        Payload::Command(c) => EntryPayload::Normal(Cmd(c.clone())),
        Payload::Membership(m) => EntryPayload::Membership(membership_from(m)?),
    };
    Ok(Entry::new(log_id, payload))
}

/// Encodes an entry for the WAL.
pub(crate) fn encode_entry(e: &Entry) -> bytes::Bytes {
    entry_to(e).encode_to_vec().into()
}

/// Decodes a WAL payload back into an entry.
pub(crate) fn decode_entry(b: &[u8]) -> Result<Entry, DecodeError> {
    let pe = pb::Entry::decode(b).map_err(|e| DecodeError {
        what: "Entry",
        why: e.to_string(),
    })?;
    entry_from(&pe)
}

/// Encodes a vote for the WAL meta.
pub(crate) fn encode_vote(v: &Vote) -> Vec<u8> {
    vote_to(v).encode_to_vec()
}

/// Decodes a vote from the WAL meta.
pub(crate) fn decode_vote(b: &[u8]) -> Result<Vote, DecodeError> {
    let pv = pb::Vote::decode(b).map_err(|e| DecodeError {
        what: "Vote",
        why: e.to_string(),
    })?;
    vote_from(&pv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_votes_round_trip() {
        let lid = LogId::new(LeaderId::new(7, 3), 42);
        let mut nodes = BTreeMap::new();
        nodes.insert(
            1,
            NodeAddr {
                addr: "127.0.0.1:1".into(),
                client_addr: "127.0.0.1:11".into(),
            },
        );
        nodes.insert(
            2,
            NodeAddr {
                addr: "127.0.0.1:2".into(),
                client_addr: String::new(),
            },
        );
        let m = Membership::new(vec![[1, 2].into_iter().collect()], nodes).unwrap();
        let cmd = Cmd(pb::Command {
            kind: Some(pb::command::Kind::Noop(pb::Noop {})),
        });
        for payload in [
            EntryPayload::Blank,
            EntryPayload::Normal(cmd),
            EntryPayload::Membership(m),
        ] {
            let e = Entry::new(lid, payload);
            let back = decode_entry(&encode_entry(&e)).unwrap();
            assert_eq!(back.log_id, e.log_id);
            assert_eq!(format!("{:?}", back.payload), format!("{:?}", e.payload));
        }
        for v in [Vote::new(3, 1), Vote::new_committed(9, 2)] {
            assert_eq!(decode_vote(&encode_vote(&v)).unwrap(), v);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for b in [&b""[..], b"\x0a", b"\xff\xff\xff", b"\x12\x00"] {
            assert!(decode_entry(b).is_err());
        }
        assert!(
            decode_vote(b"").is_err(),
            "a vote without a leader id is refused"
        );
    }

    #[test]
    fn terms_and_indexes_near_the_top_of_u64_are_refused() {
        let vote = |term| pb::Vote {
            leader_id: Some(pb::LeaderId { term, node_id: 1 }),
            committed: false,
        };
        assert!(vote_from(&vote(TERM_MAX)).is_ok());
        assert!(vote_from(&vote(TERM_MAX + 1)).is_err());
        assert!(vote_from(&vote(u64::MAX)).is_err());
        let log_id = |term, index| pb::LogId {
            leader_id: Some(pb::LeaderId { term, node_id: 1 }),
            index,
        };
        assert!(log_id_from(&log_id(1, INDEX_MAX)).is_ok());
        assert!(log_id_from(&log_id(1, u64::MAX)).is_err());
        assert!(log_id_from(&log_id(u64::MAX, 1)).is_err());
    }
}
