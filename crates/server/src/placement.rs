//! Where leaders belong: a pure rule shared by the balancer and `ClusterStatus`.

/// The node meant to lead `group` when every voter is healthy: voters (sorted) taken
/// round-robin by group id, so leaders spread evenly across nodes.
pub fn preferred_leader(group: u64, voters: &[u64]) -> Option<u64> {
    if voters.is_empty() {
        return None;
    }
    let mut v = voters.to_vec();
    v.sort_unstable();
    Some(v[(group as usize) % v.len()])
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn preferred_leaders_spread_evenly() {
        let voters = [3, 1, 2];
        let mut count: BTreeMap<u64, usize> = BTreeMap::new();
        for g in 0..9 {
            *count
                .entry(preferred_leader(g, &voters).unwrap())
                .or_default() += 1;
        }
        assert_eq!(count.values().copied().collect::<Vec<_>>(), vec![3, 3, 3]);
        assert_eq!(preferred_leader(0, &[]), None);
    }
}
