//! A Maglev table as the agent keeps it between syncs: what the ring holds for one VIP, in a
//! compact form.
//!
//! The planner needs the last table it wrote for each VIP to write only the slots a change
//! moves. A table of 65,537 slots is 256 KiB as member ids (`u32`), 262 MB at 1,000 VIPs; but a
//! VIP's slots hold only its own members (and `NO_BACKEND`), a few hundred values at most. So a
//! table is kept as those values (its palette, sorted) and, per slot, an index into them of the
//! smallest width that fits: one byte per slot up to 256 values, two up to 65,536. That is 66 MB
//! at 1,000 VIPs x 100 backends, and the slots read back the same as the `u32`s would.

use std::ops::Index;

/// One VIP's table: `len` slots, each a member id or `NO_BACKEND`.
#[derive(Clone)]
pub struct Table {
    /// The distinct values of the slots, sorted.
    values: Vec<u32>,
    slots: Slots,
}

#[derive(Clone)]
enum Slots {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl Table {
    /// The table whose slots hold `slots`.
    pub fn new(slots: &[u32]) -> Self {
        let mut values = slots.to_vec();
        values.sort_unstable();
        values.dedup();
        let index = |v: &u32| values.binary_search(v).expect("a value of the table");
        let slots = if values.len() <= 1 << 8 {
            Slots::U8(index_all(slots, &values, |i| i as u8))
        } else if values.len() <= 1 << 16 {
            Slots::U16(index_all(slots, &values, |i| i as u16))
        } else {
            Slots::U32(slots.iter().map(|v| index(v) as u32).collect())
        };
        Self { values, slots }
    }

    /// The table whose slot `s` holds `values[choices[s]]`, or `empty` where `choices[s]` is
    /// `u32::MAX`: a Maglev table built over the positions of its entries, which maps to
    /// indices without looking a value up per slot.
    pub fn of_choices(values: &[u32], choices: &[u32], empty: u32) -> Self {
        let mut used = vec![false; values.len()];
        let mut any_empty = false;
        for &c in choices {
            match used.get_mut(c as usize) {
                Some(u) => *u = true,
                None => any_empty = true,
            }
        }
        let mut palette: Vec<u32> = values
            .iter()
            .zip(&used)
            .filter(|(_, u)| **u)
            .map(|(v, _)| *v)
            .chain(any_empty.then_some(empty))
            .collect();
        palette.sort_unstable();
        palette.dedup();
        let at = |v: u32| palette.binary_search(&v).expect("a value of the table") as u32;
        let index: Vec<u32> = values
            .iter()
            .zip(&used)
            .map(|(v, u)| if *u { at(*v) } else { 0 })
            .collect();
        let empty_at = if any_empty { at(empty) } else { 0 };
        let of = |c: &u32| index.get(*c as usize).copied().unwrap_or(empty_at);
        let slots = if palette.len() <= 1 << 8 {
            Slots::U8(choices.iter().map(|c| of(c) as u8).collect())
        } else if palette.len() <= 1 << 16 {
            Slots::U16(choices.iter().map(|c| of(c) as u16).collect())
        } else {
            Slots::U32(choices.iter().map(of).collect())
        };
        Self {
            values: palette,
            slots,
        }
    }

    /// Calls `f` with each slot and its value, in order.
    pub fn for_each(&self, mut f: impl FnMut(usize, u32)) {
        let v = &self.values;
        match &self.slots {
            Slots::U8(s) => s.iter().enumerate().for_each(|(i, x)| f(i, v[*x as usize])),
            Slots::U16(s) => s.iter().enumerate().for_each(|(i, x)| f(i, v[*x as usize])),
            Slots::U32(s) => s.iter().enumerate().for_each(|(i, x)| f(i, v[*x as usize])),
        }
    }

    /// A table of `len` slots that all hold `v`.
    pub fn filled(v: u32, len: usize) -> Self {
        Self {
            values: vec![v],
            slots: Slots::U8(vec![0; len]),
        }
    }

    pub fn len(&self) -> usize {
        match &self.slots {
            Slots::U8(s) => s.len(),
            Slots::U16(s) => s.len(),
            Slots::U32(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slot `i`'s value.
    pub fn get(&self, i: usize) -> u32 {
        self[i]
    }

    /// The slots' values in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len()).map(|i| self[i])
    }

    /// The slots' values as member ids.
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }

    /// The distinct values of the slots, sorted.
    pub fn values(&self) -> &[u32] {
        &self.values
    }

    /// Whether a slot holds `v`.
    pub fn contains(&self, v: u32) -> bool {
        self.values.binary_search(&v).is_ok()
    }

    /// The slots where `new` differs from `self`, with `new`'s values; every slot of `new` if
    /// the lengths differ.
    pub fn changes(&self, new: &Table) -> Vec<(u32, u32)> {
        if self.len() != new.len() {
            return new.iter().enumerate().map(|(s, v)| (s as u32, v)).collect();
        }
        // Compare indices through a map of this table's palette onto the new one's, so that a
        // slot costs two loads and a compare.
        let onto: Vec<u32> = self
            .values
            .iter()
            .map(|v| new.values.binary_search(v).map_or(u32::MAX, |i| i as u32))
            .collect();
        (0..new.len())
            .filter(|&s| onto[self.index(s)] != new.index(s) as u32)
            .map(|s| (s as u32, new[s]))
            .collect()
    }

    /// Slot `i`'s index into the palette.
    fn index(&self, i: usize) -> usize {
        match &self.slots {
            Slots::U8(s) => s[i] as usize,
            Slots::U16(s) => s[i] as usize,
            Slots::U32(s) => s[i] as usize,
        }
    }

    /// Bytes on the heap.
    pub fn heap_bytes(&self) -> usize {
        let per_slot = match &self.slots {
            Slots::U8(_) => 1,
            Slots::U16(_) => 2,
            Slots::U32(_) => 4,
        };
        self.values.len() * 4 + self.len() * per_slot
    }
}

/// Each of `slots` as its index in `values`, narrowed by `narrow`.
fn index_all<T>(slots: &[u32], values: &[u32], narrow: impl Fn(usize) -> T) -> Vec<T> {
    // Runs of equal slots are rare in a Maglev table, but the last value looked up is cheap to
    // remember.
    let mut last = None;
    slots
        .iter()
        .map(|v| {
            let i = match last {
                Some((lv, li)) if lv == *v => li,
                _ => {
                    let i = values.binary_search(v).expect("a value of the table");
                    last = Some((*v, i));
                    i
                }
            };
            narrow(i)
        })
        .collect()
}

impl Index<usize> for Table {
    type Output = u32;

    fn index(&self, i: usize) -> &u32 {
        &self.values[Table::index(self, i)]
    }
}

impl PartialEq for Table {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Table {}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl From<&[u32]> for Table {
    fn from(slots: &[u32]) -> Self {
        Self::new(slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of `len` slots cycling through `distinct` values (spread out, not 0..distinct).
    fn slots(len: usize, distinct: u32) -> Vec<u32> {
        (0..len as u32)
            .map(|i| (i * 7919 % distinct) * 3 + 5)
            .collect()
    }

    #[test]
    fn every_width_reads_back_the_slots_it_was_given() {
        for (distinct, bytes_per_slot) in [(1, 1), (256, 1), (257, 2), (65_536, 2), (70_000, 4)] {
            let s = slots(140_009, distinct);
            let t = Table::new(&s);
            assert_eq!(t.len(), s.len());
            assert_eq!(t.to_vec(), s, "{distinct} values");
            assert_eq!(t[1234], s[1234]);
            assert_eq!(
                t.heap_bytes(),
                distinct as usize * 4 + s.len() * bytes_per_slot,
                "{distinct} values"
            );
        }
    }

    #[test]
    fn a_table_of_choices_is_the_table_of_their_values() {
        let values = [40, 7, 7_000_000, 12, 3];
        // Choice 3 is never made; u32::MAX is an empty slot.
        let choices: Vec<u32> = (0..1009u32)
            .map(|i| [0, 1, 2, 4, u32::MAX][i as usize % 5])
            .collect();
        let want: Vec<u32> = choices
            .iter()
            .map(|&c| values.get(c as usize).copied().unwrap_or(u32::MAX - 1))
            .collect();
        let t = Table::of_choices(&values, &choices, u32::MAX - 1);
        assert_eq!(t, Table::new(&want));
        assert_eq!(t.values(), &[3, 7, 40, 7_000_000, u32::MAX - 1]);
        let mut seen = Vec::new();
        t.for_each(|i, v| seen.push((i, v)));
        assert_eq!(seen, want.iter().copied().enumerate().collect::<Vec<_>>());
    }

    #[test]
    fn changes_are_the_slots_that_differ_with_their_new_values() {
        let old = slots(1009, 10);
        let mut new = old.clone();
        new[3] = 999; // a value the old table does not have
        new[500] = old[501]; // one it has, elsewhere
        let want: Vec<(u32, u32)> = (0..1009u32)
            .filter(|&i| old[i as usize] != new[i as usize])
            .map(|i| (i, new[i as usize]))
            .collect();
        assert!(!want.is_empty());
        assert_eq!(Table::new(&old).changes(&Table::new(&new)), want);
        assert!(Table::new(&old).changes(&Table::new(&old)).is_empty());
        let grown = slots(1013, 10);
        assert_eq!(Table::new(&old).changes(&Table::new(&grown)).len(), 1013);
    }

    #[test]
    fn equal_tables_compare_equal_whatever_their_palettes() {
        let a = Table::filled(7, 11);
        assert_eq!(a, Table::new(&[7; 11]));
        assert_ne!(a, Table::filled(7, 12));
        assert_ne!(a, Table::filled(8, 11));
        assert!(a.contains(7) && !a.contains(8));
    }
}
