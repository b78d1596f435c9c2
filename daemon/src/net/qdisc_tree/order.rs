//! Creation order from the order of a dump: the kernel's hash tables modelled.

use super::*;

/// The kernel's hash tables whose listing order reveals creation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HashModel {
    /// A device's qdisc hash: 16 buckets (hash_32 of the handle), newest
    /// first in each.
    Qdisc,
    /// `Qdisc_class_hash` (htb, drr, qfq): starts with 4 buckets and doubles
    /// when more than 3/4 full; rehashing reverses each bucket.
    Class,
}

impl HashModel {
    pub(super) fn initial_size(self) -> usize {
        match self {
            Self::Qdisc => 16,
            Self::Class => 4,
        }
    }

    pub(super) fn grows_after(self, count: usize, size: usize) -> bool {
        self == Self::Class && count * 4 > size * 3
    }

    pub(super) fn bucket(self, key: u32, size: usize) -> usize {
        match self {
            // hash_32(key, 4): GOLDEN_RATIO_32 multiplication, top bits.
            Self::Qdisc => (key.wrapping_mul(0x61C8_8647) >> 28) as usize,
            // qdisc_class_hash()
            Self::Class => {
                let mut h = key;
                h ^= h >> 8;
                h ^= h >> 4;
                h as usize & (size - 1)
            }
        }
    }

    /// The order the kernel lists `keys` in after inserting them in this order.
    pub(super) fn listing(self, keys: &[u32]) -> Vec<u32> {
        let mut size = self.initial_size();
        let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); size];
        for (n, &k) in keys.iter().enumerate() {
            buckets[self.bucket(k, size)].insert(0, k);
            if self.grows_after(n + 1, size) {
                size *= 2;
                let mut grown: Vec<Vec<u32>> = vec![Vec::new(); size];
                for old in &buckets {
                    for &k in old {
                        grown[self.bucket(k, size)].insert(0, k);
                    }
                }
                buckets = grown;
            }
        }
        buckets.concat()
    }
}

/// Dependency order, taking the candidates `prefer` ranks lowest first.
pub(super) fn topological(deps: &[Option<usize>], prefer: impl Fn(usize) -> usize) -> Vec<usize> {
    let n = deps.len();
    let mut placed = vec![false; n];
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let ready =
            (0..n).filter(|&i| !placed[i] && deps[i].is_none_or(|d| placed[d] || d == i)).min_by_key(|&i| prefer(i));
        // A cycle cannot come from a kernel dump; take the rest as listed.
        let i = ready.unwrap_or_else(|| (0..n).find(|&i| !placed[i]).unwrap_or_default());
        placed[i] = true;
        out.push(i);
    }
    out
}

/// An order of inserting `keys` (given in the kernel's listing order), each
/// after its dependency, that makes the kernel list them in that order
/// again. Falls back to newest-first by listing when none is found (a
/// model that does not fit, or a history with deletions).
pub(super) fn insertion_order(model: HashModel, keys: &[u32], deps: &[Option<usize>]) -> Vec<usize> {
    let n = keys.len();
    let fallback = || topological(deps, |i| n - i);
    if n == 0 || n > 200 {
        return fallback();
    }
    let mut size = model.initial_size();
    let mut grew = Vec::with_capacity(n);
    for count in 1..=n {
        let g = model.grows_after(count, size);
        if g {
            size *= 2;
        }
        grew.push(g);
    }
    let bucket: Vec<usize> = keys.iter().map(|&k| model.bucket(k, size)).collect();
    if bucket.windows(2).any(|w| w[0] > w[1]) {
        return fallback();
    }
    // Where the item inserted at time t ends up among the items of its
    // bucket: inserting prepends, growing reverses.
    let mut list: Vec<usize> = Vec::with_capacity(n);
    for (t, &g) in grew.iter().enumerate() {
        list.insert(0, t);
        if g {
            list.reverse();
        }
    }
    let mut rank = vec![0; n];
    for (pos, &t) in list.iter().enumerate() {
        rank[t] = pos;
    }
    // Several tries with different preferences among the candidates, each
    // with a bounded budget: a dead end the forward check misses costs one
    // try, not the whole search.
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
    for attempt in 0..40 {
        let mut prefer: Vec<usize> = (0..n).rev().collect();
        if attempt > 0 {
            prefer.shuffle(&mut rng);
        }
        let mut search = Search::new(deps, &bucket, &rank, prefer);
        if search.place() {
            let order = search.order;
            let keys_in_order: Vec<u32> = order.iter().map(|&i| keys[i]).collect();
            if model.listing(&keys_in_order) == keys {
                return order;
            }
        }
    }
    fallback()
}

/// Depth-first search over insertion orders. Within a bucket, the items'
/// ranks (by insertion time) must increase along the listing; after each
/// placement, every run of still unplaced items between two placed ones of
/// a bucket must have enough later time slots whose ranks fall between
/// theirs, which cuts a dead end off as soon as it is entered.
pub(super) struct Search<'a> {
    pub(super) deps: &'a [Option<usize>],
    pub(super) bucket: &'a [usize],
    pub(super) rank: &'a [usize],
    /// The items of each bucket in listing order.
    pub(super) members: Vec<Vec<usize>>,
    /// below[t][r]: time slots from t on whose rank is below r.
    pub(super) below: Vec<Vec<u16>>,
    /// Candidates in the order to try them.
    pub(super) prefer: Vec<usize>,
    pub(super) time: Vec<Option<usize>>,
    pub(super) order: Vec<usize>,
    pub(super) budget: u32,
}

impl<'a> Search<'a> {
    pub(super) fn new(deps: &'a [Option<usize>], bucket: &'a [usize], rank: &'a [usize], prefer: Vec<usize>) -> Self {
        let n = deps.len();
        let mut members = vec![Vec::new(); bucket.iter().max().map_or(0, |b| b + 1)];
        for (i, &b) in bucket.iter().enumerate() {
            members[b].push(i);
        }
        let mut below = vec![vec![0u16; n + 1]];
        for t in (0..n).rev() {
            let later = &below[below.len() - 1];
            let row = (0..=n).map(|r| later[r] + u16::from(rank[t] < r)).collect();
            below.push(row);
        }
        below.reverse();
        Self { deps, bucket, rank, members, below, prefer, time: vec![None; n], order: Vec::new(), budget: 3_000 }
    }

    /// Whether the items not placed yet still have room, with slots from
    /// `from` on free.
    pub(super) fn room(&self, from: usize) -> bool {
        let n = self.deps.len();
        self.members.iter().all(|items| {
            let mut lo = 0; // ranks must be >= lo
            let mut run = 0u16;
            for &i in items {
                match self.time[i] {
                    None => run += 1,
                    Some(t) => {
                        let hi = self.rank[t];
                        if run > 0 && (hi < lo || self.below[from][hi] - self.below[from][lo] < run) {
                            return false;
                        }
                        run = 0;
                        lo = hi + 1;
                    }
                }
            }
            run == 0 || (lo <= n && self.below[from][n] - self.below[from][lo] >= run)
        })
    }

    pub(super) fn place(&mut self) -> bool {
        let n = self.deps.len();
        let t = self.order.len();
        if t == n {
            return true;
        }
        if self.budget == 0 {
            return false;
        }
        self.budget -= 1;
        for k in 0..n {
            let c = self.prefer[k];
            if self.time[c].is_some() || self.deps[c].is_some_and(|d| d != c && self.time[d].is_none()) {
                continue;
            }
            let fits = self.order.iter().all(|&f| {
                self.bucket[f] != self.bucket[c] || (self.rank[self.time[f].unwrap_or(0)] < self.rank[t]) == (f < c)
            });
            if !fits {
                continue;
            }
            self.time[c] = Some(t);
            self.order.push(c);
            if self.room(t + 1) && self.place() {
                return true;
            }
            self.order.pop();
            self.time[c] = None;
            if self.budget == 0 {
                return false;
            }
        }
        false
    }
}
