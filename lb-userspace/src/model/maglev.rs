//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016, §3.4), pure and deterministic.
//!
//! Each backend has a permutation of the table's slots, fixed by its identity alone: an offset and
//! a skip from two hashes of its key. Backends take turns claiming their next free preferred slot
//! until the table is full. Weights decide how often a backend gets a turn: every round, each
//! backend earns credit equal to its weight and takes one turn per `max_weight` of credit, so turns
//! are spread evenly through the fill and every backend ends within one slot of its exact share.
//!
//! The table depends only on the set of (key, weight) pairs, not on their order: backends are
//! sorted by key first. Every node therefore builds the same table from the same backends.

use xxhash_rust::xxh64::xxh64;

/// A backend as Maglev sees it: a stable identity and a relative weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Bytes that identify the backend the same way on every node (its address and port).
    pub key: &'a [u8],
    /// Relative weight; 0 means draining: the backend gets no slot (its flows stay through the
    /// flow table, new ones go elsewhere).
    pub weight: u32,
    /// What a slot owned by this backend holds (its backend id).
    pub value: u32,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error(
        "table size {0} is not prime (Maglev needs a prime size for its permutations to cover every slot)"
    )]
    NotPrime(u32),
    #[error("table size {size} is smaller than the {backends} backends it must hold")]
    TooSmall { size: u32, backends: usize },
    #[error("two backends have the same key {0:?}")]
    DuplicateKey(Vec<u8>),
}

const OFFSET_SEED: u64 = 0x6c62_6f66_6673_6574; // "lboffset"
const SKIP_SEED: u64 = 0x6c62_736b_6970_2121; // "lbskip!!"

/// Whether `n` is prime (trial division; table sizes are small).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u64;
    while d * d <= n as u64 {
        if (n as u64).is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Checks a table size for `backends` backends: an error if it can't work, and `Some(warning)`
/// if it works but balances worse than 1 % (the paper's rule: at least 100 slots per backend).
pub fn check_size(size: u32, backends: usize) -> Result<Option<String>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::NotPrime(size));
    }
    if (size as usize) < backends {
        return Err(MaglevError::TooSmall { size, backends });
    }
    Ok(((size as usize) < backends * 100).then(|| {
        format!(
            "table size {size} is below 100 slots for each of {backends} backends: shares may be off by more than 1 %"
        )
    }))
}

/// Builds the table: `size` slots, each holding an entry's `value`, or `empty` if every entry
/// has weight 0 (or there are none).
pub fn build(entries: &[Entry<'_>], size: u32, empty: u32) -> Result<Vec<u32>, MaglevError> {
    check_size(size, entries.len())?;
    let m = size as u64;
    let mut live: Vec<&Entry<'_>> = entries.iter().collect();
    live.sort_by(|a, b| a.key.cmp(b.key));
    if let Some(w) = live.windows(2).find(|w| w[0].key == w[1].key) {
        return Err(MaglevError::DuplicateKey(w[0].key.to_vec()));
    }
    live.retain(|e| e.weight > 0);
    let mut table = vec![empty; size as usize];
    if live.is_empty() {
        return Ok(table);
    }

    // `slot` is the backend's next preferred slot, `(offset + next * skip) % m` for the turns
    // it has taken so far, stepped by one addition instead of a division per probe.
    struct Fill {
        slot: u64,
        skip: u64,
        weight: u64,
        credit: u64,
        value: u32,
    }
    let mut fills: Vec<Fill> = live
        .iter()
        .map(|e| Fill {
            slot: xxh64(e.key, OFFSET_SEED) % m,
            skip: xxh64(e.key, SKIP_SEED) % (m - 1) + 1,
            weight: e.weight as u64,
            credit: 0,
            value: e.value,
        })
        .collect();
    let max_weight = fills.iter().map(|f| f.weight).max().unwrap_or(1);
    // Which slots are held, a bit each: 8 KiB for 65,537 slots stays in the L1 cache, where
    // the probes' random reads land (a byte each would not).
    let mut taken = vec![0u64; (size as usize).div_ceil(64)];
    let held = |t: &[u64], s: u64| t[(s >> 6) as usize] >> (s & 63) & 1 != 0;
    let mut filled = 0u64;
    'fill: loop {
        for f in fills.iter_mut() {
            f.credit += f.weight;
            if f.credit < max_weight {
                continue;
            }
            f.credit -= max_weight;
            // The next slot of this backend's permutation that nobody holds yet. `skip` is in
            // 1..m and m is prime, so the permutation visits every slot.
            while held(&taken, f.slot) {
                f.slot = step(f.slot, f.skip, m);
            }
            let slot = f.slot;
            f.slot = step(f.slot, f.skip, m);
            taken[(slot >> 6) as usize] |= 1 << (slot & 63);
            table[slot as usize] = f.value;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    Ok(table)
}

/// `(slot + skip) % m` for `slot` and `skip` below `m`.
fn step(slot: u64, skip: u64, m: u64) -> u64 {
    let s = slot + skip;
    if s >= m { s - m } else { s }
}

/// How many slots each value holds.
pub fn shares(table: &[u32]) -> std::collections::HashMap<u32, usize> {
    let mut out = std::collections::HashMap::new();
    for &v in table {
        *out.entry(v).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65_537;
    const EMPTY: u32 = u32::MAX;

    fn keys(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}:80", i / 65536, (i / 256) % 256, i % 256).into_bytes())
            .collect()
    }

    fn entries<'a>(keys: &'a [Vec<u8>], weights: &[u32]) -> Vec<Entry<'a>> {
        keys.iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (k, &w))| Entry {
                key: k,
                weight: w,
                value: i as u32,
            })
            .collect()
    }

    /// Largest relative deviation of any backend's share from its weight's share.
    fn worst_error(table: &[u32], weights: &[u32]) -> f64 {
        let s = shares(table);
        let total: u64 = weights.iter().map(|&w| w as u64).sum();
        weights
            .iter()
            .enumerate()
            .filter(|(_, w)| **w > 0)
            .map(|(i, &w)| {
                let want = w as f64 / total as f64 * table.len() as f64;
                let got = *s.get(&(i as u32)).unwrap_or(&0) as f64;
                (got - want).abs() / want
            })
            .fold(0.0, f64::max)
    }

    fn moved(a: &[u32], b: &[u32]) -> usize {
        a.iter().zip(b).filter(|(x, y)| x != y).count()
    }

    #[test]
    fn same_table_whatever_the_input_order() {
        let k = keys(50);
        let weights: Vec<u32> = (0..50).map(|i| 1 + i % 7).collect();
        let e = entries(&k, &weights);
        let a = build(&e, M, EMPTY).unwrap();
        let mut rev = e.clone();
        rev.reverse();
        rev.swap(3, 17);
        assert_eq!(
            a,
            build(&rev, M, EMPTY).unwrap(),
            "table depends on input order"
        );
    }

    #[test]
    fn no_empty_slot_and_weights_respected_within_one_percent() {
        for (what, weights) in [
            ("2:1 (200/100)", vec![200, 100]),
            ("1:10", vec![1, 10]),
            ("100 equal", vec![100; 100]),
            ("mixed 1..=16", (0..64).map(|i| 1 + i % 16).collect()),
        ] {
            let k = keys(weights.len());
            let t = build(&entries(&k, &weights), M, EMPTY).unwrap();
            assert!(!t.contains(&EMPTY), "{what}: empty slot");
            let err = worst_error(&t, &weights);
            assert!(
                err < 0.01,
                "{what}: a share is {:.3} % off its weight",
                err * 100.0
            );
        }
    }

    #[test]
    fn draining_backends_get_no_slots() {
        let k = keys(3);
        let t = build(&entries(&k, &[5, 0, 5]), M, EMPTY).unwrap();
        assert!(!t.contains(&1), "weight-0 backend holds slots");
        assert!(!t.contains(&EMPTY));
        let t = build(&entries(&k, &[0, 0, 0]), M, EMPTY).unwrap();
        assert!(
            t.iter().all(|&v| v == EMPTY),
            "all draining: slots must be empty"
        );
    }

    /// Fractions of slots that move when one of `n` backends is removed, and when one is added.
    fn disruption(n: usize, m: u32) -> (f64, f64) {
        let k = keys(n + 1);
        let w = vec![1; n + 1];
        let base = build(&entries(&k[..n], &w[..n]), m, EMPTY).unwrap();
        let mut without = entries(&k[..n], &w[..n]);
        without.remove(n / 2);
        let removed = build(&without, m, EMPTY).unwrap();
        let added = build(&entries(&k, &w), m, EMPTY).unwrap();
        (
            moved(&base, &removed) as f64 / m as f64,
            moved(&base, &added) as f64 / m as f64,
        )
    }

    /// Removing one of N moves close to 1/N of the slots, adding one close to 1/(N+1). Maglev
    /// buys its balance with some extra movement, which grows with N (the permutations' walks
    /// get longer, so a freed slot cascades further): within 2x of ideal up to N = 100 at the
    /// default size; at N = 1000 the figure is printed and only guarded against regressions.
    #[test]
    fn disruption_is_close_to_minimal() {
        for (n, m, bound) in [(10, M, 1.2), (100, M, 2.0), (1000, M, 8.0)] {
            let (rm, add) = disruption(n, m);
            let (ideal_rm, ideal_add) = (1.0 / n as f64, 1.0 / (n + 1) as f64);
            eprintln!(
                "M={m} N={n}: removing one moves {:.4} of slots (ideal {:.4}, x{:.2}); adding one moves {:.4} (ideal {:.4}, x{:.2})",
                rm,
                ideal_rm,
                rm / ideal_rm,
                add,
                ideal_add,
                add / ideal_add
            );
            assert!(
                rm >= ideal_rm * 0.99 && add >= ideal_add * 0.9,
                "N={n}: fewer moves than possible?"
            );
            assert!(rm / ideal_rm < bound, "M={m} N={n}: removal moved {rm:.4}");
            assert!(
                add / ideal_add < bound,
                "M={m} N={n}: addition moved {add:.4}"
            );
        }
    }

    /// Balance as the Maglev paper reports it: the largest share over the mean share, equal weights.
    #[test]
    fn balance_for_10_100_1000_backends() {
        for n in [10usize, 100, 1000] {
            let k = keys(n);
            let t = build(&entries(&k, &vec![1; n]), M, EMPTY).unwrap();
            let s = shares(&t);
            let max = *s.values().max().unwrap() as f64;
            let min = *s.values().min().unwrap() as f64;
            let mean = M as f64 / n as f64;
            eprintln!(
                "M={M} N={n}: largest share / mean = {:.4}, smallest / mean = {:.4}",
                max / mean,
                min / mean
            );
            assert!(
                max - mean <= 1.0 && mean - min <= 1.0,
                "N={n}: slots {min}..{max} around {mean:.1}"
            );
        }
    }

    #[test]
    fn build_time_for_1000_backends() {
        let k = keys(1000);
        let w: Vec<u32> = (0..1000).map(|i| 50 + i % 100).collect();
        let e = entries(&k, &w);
        let t = std::time::Instant::now();
        let table = build(&e, M, EMPTY).unwrap();
        let elapsed = t.elapsed();
        // With ~66 slots a backend, one slot is 1.5 %: the bound that matters is in slots. A
        // backend can lose at most one turn to unspent credit and one to the cut last round.
        let s = shares(&table);
        let total: u32 = w.iter().sum();
        let worst_slots = w
            .iter()
            .enumerate()
            .map(|(i, &wi)| (s[&(i as u32)] as f64 - wi as f64 / total as f64 * M as f64).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "M={M} N=1000 weights 50..=149: built in {elapsed:?}; every backend within {worst_slots:.2} slots of its exact share ({:.2} % relative)",
            worst_error(&table, &w) * 100.0
        );
        assert!(
            worst_slots <= 2.0,
            "a backend is {worst_slots} slots off its share"
        );
    }

    /// The table as the paper writes it (`(offset + j * skip) % m` for a backend's j-th
    /// preference), which [`build`] computes by steps: the two must agree slot for slot, or
    /// nodes of two versions would send the same flow to different backends.
    fn reference(entries: &[Entry<'_>], m: u32) -> Vec<u32> {
        let m64 = m as u64;
        let mut live: Vec<&Entry<'_>> = entries.iter().filter(|e| e.weight > 0).collect();
        live.sort_by(|a, b| a.key.cmp(b.key));
        let max_weight = live.iter().map(|e| e.weight as u64).max().unwrap_or(1);
        let mut next = vec![0u64; live.len()];
        let mut credit = vec![0u64; live.len()];
        let mut table = vec![EMPTY; m as usize];
        let mut filled = 0;
        while filled < m && !live.is_empty() {
            for (i, e) in live.iter().enumerate() {
                credit[i] += e.weight as u64;
                if credit[i] < max_weight || filled == m {
                    continue;
                }
                credit[i] -= max_weight;
                let (offset, skip) = (
                    xxh64(e.key, OFFSET_SEED) % m64,
                    xxh64(e.key, SKIP_SEED) % (m64 - 1) + 1,
                );
                let mut slot = (offset + next[i] * skip) % m64;
                while table[slot as usize] != EMPTY {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m64;
                }
                next[i] += 1;
                table[slot as usize] = e.value;
                filled += 1;
            }
        }
        table
    }

    #[test]
    fn the_table_is_the_papers_permutation_fill() {
        for (n, m) in [(3, 7), (10, 1009), (100, M), (257, 1009)] {
            let k = keys(n);
            let w: Vec<u32> = (0..n as u32).map(|i| i % 5).collect();
            let e = entries(&k, &w);
            assert_eq!(build(&e, m, EMPTY).unwrap(), reference(&e, m), "{n} in {m}");
        }
    }

    #[test]
    fn bad_sizes_are_rejected_small_ones_warned() {
        assert_eq!(check_size(65_536, 2), Err(MaglevError::NotPrime(65_536)));
        assert_eq!(check_size(1, 0), Err(MaglevError::NotPrime(1)));
        assert_eq!(
            check_size(7, 10),
            Err(MaglevError::TooSmall {
                size: 7,
                backends: 10
            })
        );
        assert!(
            check_size(1009, 20).unwrap().is_some(),
            "1009 slots for 20 backends should warn"
        );
        assert_eq!(check_size(65_537, 655), Ok(None));
        let k = keys(2);
        let mut dup = entries(&k, &[1, 1]);
        dup[1].key = dup[0].key;
        assert!(matches!(
            build(&dup, 101, EMPTY),
            Err(MaglevError::DuplicateKey(_))
        ));
        assert!([2, 3, 5, 65_537, 1_000_003].iter().all(|&p| is_prime(p)));
        assert!(
            [0, 1, 4, 9, 65_535, 1_000_001]
                .iter()
                .all(|&p| !is_prime(p))
        );
    }
}
