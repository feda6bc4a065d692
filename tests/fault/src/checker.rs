//! Checks a [`History`]: every count in [`Report::violations`] must be zero.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::history::{History, Outcome};

/// What a run did and what the checker found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Violations by kind; all must be zero.
    pub violations: BTreeMap<&'static str, u64>,
    /// One example per violation kind (for the failure message).
    pub examples: BTreeMap<&'static str, String>,
    /// Sends attempted / acknowledged / failed / unknown.
    pub sends: [u64; 4],
    /// Commits attempted / acknowledged / failed / unknown.
    pub commits: [u64; 4],
    /// Records polled by consumers.
    pub polled: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Leader killed → next acknowledged write, in ms, p50 and p99 (and how many).
    pub failover_ms: Option<(f64, f64, usize)>,
    /// Longest time without an acknowledged write while at most one node was faulty, in ms.
    pub longest_stall_ms: f64,
    /// Heal or restart → next acknowledged write, in ms: the slowest.
    pub slowest_recovery_ms: f64,
}

impl Report {
    /// Whether every violation count is zero.
    pub fn ok(&self) -> bool {
        self.violations.values().all(|v| *v == 0)
    }

    fn count(&mut self, kind: &'static str, example: impl FnOnce() -> String) {
        *self.violations.entry(kind).or_default() += 1;
        self.examples.entry(kind).or_insert_with(example);
    }
}

/// Every violation kind, so a clean report lists them all with zero.
pub const KINDS: [&str; 17] = [
    "lost acknowledged writes",
    "offsets with two values",
    "duplicated values",
    "gaps in offsets",
    "polls that skip or go back",
    "read values whose send failed",
    "read values never sent",
    "order against real time",
    "replicas that diverge",
    "commits gone back or lost",
    "acks at a different offset",
    "writes resumed later than 5 s after a heal",
    "replicas with another log start",
    "replicas missing records",
    "nodes that exited on their own",
    "lost votes accepted",
    "storage failures not reported or not healed",
];

/// Fault kinds the nemesis records when the system under test misbehaved, and the violation
/// each counts as.
const MISBEHAVIOUR: [(&str, &str); 3] = [
    ("exited", "nodes that exited on their own"),
    ("lost-vote-accepted", "lost votes accepted"),
    (
        "storage-unreported",
        "storage failures not reported or not healed",
    ),
];

/// Time allowed between a heal (or restart) and the next acknowledged write.
pub const RECOVERY_MS: f64 = 5_000.0;

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Checks `h`.
pub fn check(h: &History) -> Report {
    let mut r = Report::default();
    for k in KINDS {
        r.violations.insert(k, 0);
    }
    let tally = |o: Outcome, t: &mut [u64; 4]| {
        t[0] += 1;
        t[match o {
            Outcome::Ok => 1,
            Outcome::Fail => 2,
            Outcome::Unknown => 3,
        }] += 1;
    };
    for s in &h.sends {
        tally(s.outcome, &mut r.sends);
    }
    for c in &h.commits {
        tally(c.outcome, &mut r.commits);
    }
    for f in &h.faults {
        *r.faults.entry(f.kind.clone()).or_default() += 1;
        for (kind, violation) in MISBEHAVIOUR {
            if f.kind == kind {
                r.count(violation, || format!("{}: {}", f.kind, f.target));
            }
        }
    }
    r.polled = h.polls.iter().map(|p| p.records.len() as u64).sum();

    let sent: HashMap<&str, &crate::history::Send> =
        h.sends.iter().map(|s| (s.value.as_str(), s)).collect();

    // (partition, offset) → value, from every read; value → (partition, offset) per source.
    let mut at: HashMap<(u32, i64), String> = HashMap::new();
    let mut see = |r: &mut Report, p: u32, o: i64, v: &str, src: &str| match at.get(&(p, o)) {
        Some(prev) if *prev != v => r.count("offsets with two values", || {
            format!("partition {p} offset {o}: {prev:?} and {v:?} (seen in {src})")
        }),
        Some(_) => {}
        None => {
            at.insert((p, o), v.to_string());
        }
    };
    for f in &h.finals {
        for (o, v) in &f.records {
            see(&mut r, f.partition, *o, v, &f.source);
        }
    }
    for p in &h.polls {
        for (o, v) in &p.records {
            see(&mut r, p.partition, *o, v, "a consumer poll");
        }
    }

    // The leader's final log per partition.
    let leader: BTreeMap<u32, &crate::history::FinalRead> = h
        .finals
        .iter()
        .filter(|f| f.source == "leader")
        .map(|f| (f.partition, f))
        .collect();
    let mut where_: HashMap<&str, (u32, i64)> = HashMap::new();
    for (p, f) in &leader {
        let mut expect = f.log_start;
        for (o, v) in &f.records {
            if *o != expect {
                r.count("gaps in offsets", || {
                    format!("partition {p}: offset {o} follows {}", expect - 1)
                });
            }
            expect = o + 1;
            match where_.get(v.as_str()) {
                Some(prev) => r.count("duplicated values", || {
                    format!("{v:?} at {prev:?} and at ({p}, {o})")
                }),
                None => {
                    where_.insert(v.as_str(), (*p, *o));
                }
            }
            match sent.get(v.as_str()) {
                None => r.count("read values never sent", || format!("{v:?} at ({p}, {o})")),
                Some(s) if s.outcome == Outcome::Fail => r
                    .count("read values whose send failed", || {
                        format!("{v:?} at ({p}, {o}): {:?}", s.error)
                    }),
                _ => {}
            }
        }
        if expect != f.high_watermark {
            r.count("gaps in offsets", || {
                format!(
                    "partition {p}: read up to {expect}, high watermark {}",
                    f.high_watermark
                )
            });
        }
    }
    // Values consumers read must exist too.
    for p in &h.polls {
        for (o, v) in &p.records {
            if !sent.contains_key(v.as_str()) {
                r.count("read values never sent", || {
                    format!("{v:?} polled at ({}, {o})", p.partition)
                });
            }
        }
    }

    // Every acknowledged send is in the final log, where its ack said.
    for s in h.sends.iter().filter(|s| s.outcome == Outcome::Ok) {
        match (where_.get(s.value.as_str()), s.acked_at) {
            (None, _) => r.count("lost acknowledged writes", || {
                format!("{:?} acknowledged at {:?}", s.value, s.acked_at)
            }),
            (Some(found), Some(acked)) if *found != acked => {
                r.count("acks at a different offset", || {
                    format!(
                        "{:?} acknowledged at {acked:?}, found at {found:?}",
                        s.value
                    )
                })
            }
            _ => {}
        }
    }

    // Real-time order per partition: acknowledged before another was invoked ⇒ smaller offset.
    let mut acked: BTreeMap<u32, Vec<(f64, f64, i64, &str)>> = BTreeMap::new();
    for s in h.sends.iter().filter(|s| s.outcome == Outcome::Ok) {
        if let Some((p, o)) = s.acked_at {
            acked
                .entry(p)
                .or_default()
                .push((s.invoke, s.complete, o, &s.value));
        }
    }
    for (p, mut ops) in acked {
        ops.sort_by(|a, b| a.0.total_cmp(&b.0));
        // For each op, the largest offset among ops that completed before it was invoked.
        let mut by_complete = ops.clone();
        by_complete.sort_by(|a, b| a.1.total_cmp(&b.1));
        let mut j = 0;
        let mut max_before: Option<(i64, &str)> = None;
        for (invoke, _, o, v) in &ops {
            while j < by_complete.len() && by_complete[j].1 < *invoke {
                let (_, _, oo, vv) = by_complete[j];
                if max_before.is_none_or(|(m, _)| oo > m) {
                    max_before = Some((oo, vv));
                }
                j += 1;
            }
            if let Some((m, mv)) = max_before
                && m >= *o
            {
                r.count("order against real time", || {
                    format!("partition {p}: {mv:?} at {m} was acknowledged before {v:?} was sent, which got {o}")
                });
            }
        }
    }

    // Every node's replica is a prefix of the leader's log (or equal to it).
    for f in h.finals.iter().filter(|f| f.source != "leader") {
        let Some(l) = leader.get(&f.partition) else {
            continue;
        };
        let lmap: HashMap<i64, &str> = l.records.iter().map(|(o, v)| (*o, v.as_str())).collect();
        for (o, v) in &f.records {
            if lmap.get(o).is_some_and(|lv| lv != v)
                || (*o < l.high_watermark && !lmap.contains_key(o) && *o >= l.log_start)
            {
                r.count("replicas that diverge", || {
                    format!(
                        "partition {} offset {o}: {} has {v:?}, the leader {:?}",
                        f.partition,
                        f.source,
                        lmap.get(o)
                    )
                });
                break;
            }
        }
        // Every replica, not only the longest copy: the same log start, every record.
        if f.log_start != l.log_start {
            r.count("replicas with another log start", || {
                format!(
                    "partition {}: {} starts at {}, the leader at {}",
                    f.partition, f.source, f.log_start, l.log_start
                )
            });
        }
        let want = l
            .records
            .iter()
            .filter(|(o, _)| *o >= f.log_start.max(l.log_start))
            .count();
        let have = f
            .records
            .iter()
            .filter(|(o, _)| *o >= f.log_start.max(l.log_start))
            .count();
        if f.high_watermark != l.high_watermark || have != want {
            r.count("replicas missing records", || {
                format!(
                    "partition {}: {} holds {have} records up to {}, the leader {want} up to {}",
                    f.partition, f.source, f.high_watermark, l.high_watermark
                )
            });
        }
        if f.high_watermark > l.high_watermark {
            r.count("replicas that diverge", || {
                format!(
                    "partition {}: {} has high watermark {} above the leader's {}",
                    f.partition, f.source, f.high_watermark, l.high_watermark
                )
            });
        }
    }

    // Consumer polls: contiguous from the position, within an incarnation.
    let mut pos: HashMap<(u32, u32, u32), i64> = HashMap::new();
    for p in &h.polls {
        let key = (p.consumer, p.incarnation, p.partition);
        let expect = *pos.get(&key).unwrap_or(&p.from);
        let mut e = p.from;
        if p.from != expect {
            r.count("polls that skip or go back", || {
                format!(
                    "consumer {} partition {}: polled from {} after reaching {expect}",
                    p.consumer, p.partition, p.from
                )
            });
        }
        for (o, _) in &p.records {
            if *o != e {
                r.count("polls that skip or go back", || {
                    format!(
                        "consumer {} partition {}: offset {o} where {e} was next",
                        p.consumer, p.partition
                    )
                });
            }
            e = o + 1;
        }
        pos.insert(key, e);
    }

    // Commits: a restarted consumer resumes at its last acknowledged commit or later (a later
    // commit may have an unknown outcome), never earlier; the final committed offsets too.
    let acked_commit = |consumer: u32, partition: u32, before: f64| -> (i64, i64) {
        let mut last_ok = -1;
        let mut max_any = -1;
        for c in h
            .commits
            .iter()
            .filter(|c| c.consumer == consumer && c.partition == partition && c.invoke < before)
        {
            if c.outcome == Outcome::Ok && c.complete < before {
                last_ok = last_ok.max(c.offset);
            }
            if c.outcome != Outcome::Fail {
                max_any = max_any.max(c.offset);
            }
        }
        (last_ok, max_any)
    };
    for res in &h.resumes {
        let (ok, any) = acked_commit(res.consumer, res.partition, res.time);
        if res.committed < ok || res.committed > any.max(ok) {
            r.count("commits gone back or lost", || {
                format!(
                    "consumer {} partition {} resumed at {} after committing {ok} (at most {any})",
                    res.consumer, res.partition, res.committed
                )
            });
        }
    }
    for (consumer, partition, off) in &h.final_commits {
        let (ok, any) = acked_commit(*consumer, *partition, f64::MAX);
        if *off < ok || *off > any.max(ok) {
            r.count("commits gone back or lost", || {
                format!("consumer {consumer} partition {partition}: committed {off} at the end after committing {ok} (at most {any})")
            });
        }
    }

    // Figures: failover, longest stall with at most one node faulty, recovery after heals.
    let mut acks: Vec<f64> = h
        .sends
        .iter()
        .filter(|s| s.outcome == Outcome::Ok)
        .map(|s| s.complete)
        .collect();
    acks.sort_by(f64::total_cmp);
    let next_ack = |t: f64| acks.iter().find(|a| **a >= t).copied();
    let mut failovers: Vec<f64> = h
        .faults
        .iter()
        .filter(|f| f.leader_kill)
        .filter_map(|f| {
            h.sends
                .iter()
                .filter(|s| s.outcome == Outcome::Ok && s.complete >= f.time)
                .filter(|s| {
                    s.acked_at
                        .is_some_and(|(p, _)| f.partitions.is_empty() || f.partitions.contains(&p))
                })
                .map(|s| s.complete - f.time)
                .min_by(f64::total_cmp)
        })
        .collect();
    failovers.sort_by(f64::total_cmp);
    if !failovers.is_empty() {
        r.failover_ms = Some((pct(&failovers, 0.5), pct(&failovers, 0.99), failovers.len()));
    }
    // Faulty-node count over time, from the fault events.
    let faulty_at = |t: f64| -> u32 {
        h.faults
            .iter()
            .rfind(|f| f.time <= t)
            .map_or(0, |f| f.faulty_nodes)
    };
    let end = h.sends.iter().map(|s| s.complete).fold(0.0, f64::max);
    let mut prev = 0.0;
    for a in acks.iter().copied().chain([end]) {
        if a - prev > r.longest_stall_ms && faulty_at(prev) <= 1 && faulty_at(a) <= 1 {
            r.longest_stall_ms = a - prev;
        }
        prev = a;
    }
    for f in h
        .faults
        .iter()
        .filter(|f| matches!(f.kind.as_str(), "heal" | "restart" | "resume") && f.faulty_nodes <= 1)
    {
        // Only recoveries the run lasted long enough to see.
        if f.time + RECOVERY_MS > end {
            continue;
        }
        let took = next_ack(f.time).map_or(f64::INFINITY, |a| a - f.time);
        r.slowest_recovery_ms = r.slowest_recovery_ms.max(took);
        if took > RECOVERY_MS {
            r.count("writes resumed later than 5 s after a heal", || {
                format!(
                    "{} of {} at {:.0} ms: next acknowledged write after {took:.0} ms",
                    f.kind, f.target, f.time
                )
            });
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Commit, FinalRead, Poll, Resume, Send};

    fn send(v: &str, invoke: f64, complete: f64, at: Option<(u32, i64)>, o: Outcome) -> Send {
        Send {
            producer: 0,
            value: v.into(),
            invoke,
            complete,
            outcome: o,
            acked_at: at,
            error: None,
        }
    }

    fn read(source: &str, recs: &[(i64, &str)]) -> FinalRead {
        FinalRead {
            source: source.into(),
            partition: 0,
            log_start: 0,
            high_watermark: recs.len() as i64,
            records: recs.iter().map(|(o, v)| (*o, v.to_string())).collect(),
        }
    }

    /// Three acknowledged sends, in order, read back identically everywhere.
    fn clean() -> History {
        let log = [(0, "a"), (1, "b"), (2, "c")];
        History {
            sends: vec![
                send("a", 0.0, 1.0, Some((0, 0)), Outcome::Ok),
                send("b", 2.0, 3.0, Some((0, 1)), Outcome::Ok),
                send("c", 4.0, 5.0, Some((0, 2)), Outcome::Ok),
            ],
            polls: vec![Poll {
                consumer: 0,
                incarnation: 0,
                partition: 0,
                from: 0,
                records: vec![(0, "a".into()), (1, "b".into())],
                time: 6.0,
            }],
            commits: vec![Commit {
                consumer: 0,
                partition: 0,
                offset: 2,
                invoke: 7.0,
                complete: 8.0,
                outcome: Outcome::Ok,
            }],
            finals: vec![read("leader", &log), read("node-1", &log)],
            final_commits: vec![(0, 0, 2)],
            ..Default::default()
        }
    }

    fn only(r: &Report, kind: &str) {
        for (k, v) in &r.violations {
            if *k == kind {
                assert!(*v > 0, "{kind} not detected: {r:#?}");
            } else {
                assert_eq!(*v, 0, "{k} reported wrongly: {:?}", r.examples);
            }
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let r = check(&clean());
        assert!(r.ok(), "{:?}", r.examples);
        assert_eq!(r.sends, [3, 3, 0, 0]);
    }

    #[test]
    fn each_violation_is_detected() {
        let mut h = clean();
        h.finals[0] = read("leader", &[(0, "a"), (1, "b")]);
        h.finals[1] = read("node-1", &[(0, "a"), (1, "b")]);
        only(&check(&h), "lost acknowledged writes");

        let mut h = clean();
        h.finals[1] = read("node-1", &[(0, "a"), (1, "x"), (2, "c")]);
        h.sends.push(send("x", 0.0, 1.0, None, Outcome::Unknown));
        let r = check(&h);
        assert!(r.violations["offsets with two values"] > 0);
        assert!(r.violations["replicas that diverge"] > 0);

        let mut h = clean();
        let log = [(0, "a"), (1, "b"), (2, "c"), (3, "a")];
        h.finals = vec![read("leader", &log), read("node-1", &log)];
        only(&check(&h), "duplicated values");

        let mut h = clean();
        h.finals[0].records.remove(1);
        h.finals[1] = h.finals[0].clone();
        h.finals[1].source = "node-1".into();
        let r = check(&h);
        assert!(r.violations["gaps in offsets"] > 0);

        let mut h = clean();
        h.polls[0].records = vec![(0, "a".into()), (2, "c".into())];
        only(&check(&h), "polls that skip or go back");

        let mut h = clean();
        h.sends[2].outcome = Outcome::Fail;
        h.sends[2].acked_at = None;
        only(&check(&h), "read values whose send failed");

        let mut h = clean();
        h.sends.pop();
        only(&check(&h), "read values never sent");

        // b acknowledged before c was sent, but c got the smaller offset.
        let log = [(0, "a"), (1, "c"), (2, "b")];
        let mut h = clean();
        h.sends[1].acked_at = Some((0, 2));
        h.sends[2].acked_at = Some((0, 1));
        h.finals = vec![read("leader", &log), read("node-1", &log)];
        h.polls.clear();
        only(&check(&h), "order against real time");

        let mut h = clean();
        h.resumes.push(Resume {
            consumer: 0,
            incarnation: 1,
            partition: 0,
            committed: 1,
            time: 9.0,
        });
        only(&check(&h), "commits gone back or lost");

        let mut h = clean();
        h.sends[0].acked_at = Some((0, 5));
        assert!(check(&h).violations["acks at a different offset"] > 0);

        let mut h = clean();
        h.sends
            .push(send("d", 6000.0, 6001.0, Some((0, 3)), Outcome::Unknown));
        h.faults.push(crate::history::Fault {
            time: 10.0,
            kind: "heal".into(),
            target: "x".into(),
            faulty_nodes: 0,
            leader_kill: false,
            partitions: Vec::new(),
        });
        h.sends
            .push(send("e", 7000.0, 7001.0, None, Outcome::Unknown));
        only(&check(&h), "writes resumed later than 5 s after a heal");

        // One replica deleted a prefix the others keep (its own clock's retention).
        let mut h = clean();
        h.finals[1].log_start = 1;
        h.finals[1].records.remove(0);
        only(&check(&h), "replicas with another log start");

        // One replica never caught up (a zombie): it holds less than the leader.
        let mut h = clean();
        h.finals[1].records.truncate(1);
        h.finals[1].high_watermark = 1;
        only(&check(&h), "replicas missing records");

        for (kind, violation) in MISBEHAVIOUR {
            let mut h = clean();
            h.faults.push(crate::history::Fault {
                time: 10.0,
                kind: kind.into(),
                target: "node 2".into(),
                faulty_nodes: 1,
                leader_kill: false,
                partitions: Vec::new(),
            });
            only(&check(&h), violation);
        }
    }
}
