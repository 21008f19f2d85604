//! [`DirtyBitmap`]: a dense bitmap, one bit per 4 KiB page.

/// Bits per word of a [`DirtyBitmap`].
pub const BITS_PER_WORD: usize = 64;

/// A dense set of page indices: one bit per 4 KiB page, stored in `u64` words
/// (bit `i % 64` of word `i / 64` is page `i`), the layout KVM uses for its
/// dirty log, so a KVM bitmap can be OR-ed in word by word.
///
/// Bits past [`len`](Self::len) in the last word are always zero.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("pages", &self.pages)
            .field("ones", &self.count_ones())
            .finish()
    }
}

/// Number of words needed for `pages` bits.
pub const fn words_for(pages: usize) -> usize {
    pages.div_ceil(BITS_PER_WORD)
}

impl DirtyBitmap {
    /// An empty bitmap of `pages` bits.
    pub fn new(pages: usize) -> Self {
        Self {
            words: vec![0; words_for(pages)],
            pages,
        }
    }

    /// A bitmap over `words` (64 pages each; `len()` = 64 × words).
    pub fn from_words(words: Vec<u64>) -> Self {
        let pages = words.len() * BITS_PER_WORD;
        Self { words, pages }
    }

    /// Number of pages (bits) the bitmap covers.
    pub fn len(&self) -> usize {
        self.pages
    }

    /// True when the bitmap covers no pages at all.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Marks `page`.
    ///
    /// # Panics
    /// If `page >= len()`.
    pub fn set(&mut self, page: usize) {
        assert!(page < self.pages, "page {page} out of range {}", self.pages);
        self.words[page / BITS_PER_WORD] |= 1 << (page % BITS_PER_WORD);
    }

    /// Unmarks `page`.
    ///
    /// # Panics
    /// If `page >= len()`.
    pub fn unset(&mut self, page: usize) {
        assert!(page < self.pages, "page {page} out of range {}", self.pages);
        self.words[page / BITS_PER_WORD] &= !(1 << (page % BITS_PER_WORD));
    }

    /// Is `page` marked? Pages past the end are not.
    pub fn get(&self, page: usize) -> bool {
        page < self.pages && self.words[page / BITS_PER_WORD] & (1 << (page % BITS_PER_WORD)) != 0
    }

    /// Unmarks every page.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Number of marked pages.
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Number of marked pages in `start..end` (clamped to the bitmap).
    pub fn count_ones_in(&self, start: usize, end: usize) -> usize {
        self.iter_ones_in(start, end).count()
    }

    /// Marked pages in increasing order.
    pub fn iter_ones(&self) -> OnesIter<'_> {
        OnesIter::new(&self.words, 0, self.pages)
    }

    /// Marked pages in `start..end` (clamped to the bitmap), in increasing order.
    pub fn iter_ones_in(&self, start: usize, end: usize) -> OnesIter<'_> {
        let end = end.min(self.pages);
        OnesIter::new(&self.words, start.min(end), end)
    }

    /// Maximal runs `start..end` of marked pages, in increasing order.
    pub fn iter_runs(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let mut ones = self.iter_ones().peekable();
        std::iter::from_fn(move || {
            let start = ones.next()?;
            let mut end = start + 1;
            while ones.peek() == Some(&end) {
                ones.next();
                end += 1;
            }
            Some(start..end)
        })
    }

    /// Marks every page in `start..end`.
    ///
    /// # Panics
    /// If `end > len()` or `start > end`.
    pub fn set_range(&mut self, start: usize, end: usize) {
        assert!(
            start <= end && end <= self.pages,
            "range {start}..{end} out of 0..{}",
            self.pages
        );
        let mut page = start;
        while page < end {
            let bit = page % BITS_PER_WORD;
            let n = (BITS_PER_WORD - bit).min(end - page);
            let mask = if n == BITS_PER_WORD {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[page / BITS_PER_WORD] |= mask;
            page += n;
        }
    }

    /// ORs `other` into `self` (set union).
    ///
    /// # Panics
    /// If the two bitmaps have different lengths.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        assert_eq!(
            self.pages, other.pages,
            "merging bitmaps of different sizes"
        );
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// ORs `words` into the bitmap starting at page `first_page`, which must be
    /// a multiple of 64. Bits that fall past the end are dropped. Returns the
    /// number of bits set in `words` that fall inside the bitmap.
    ///
    /// # Panics
    /// If `first_page` is not a multiple of 64.
    pub fn or_words_at(&mut self, first_page: usize, words: &[u64]) -> usize {
        assert_eq!(
            first_page % BITS_PER_WORD,
            0,
            "first_page {first_page} not 64-aligned"
        );
        let first_word = first_page / BITS_PER_WORD;
        let mut ones = 0;
        for (i, &w) in words.iter().enumerate() {
            let Some(dst) = self.words.get_mut(first_word + i) else {
                break;
            };
            *dst |= w;
            ones += w.count_ones() as usize;
        }
        self.trim_tail();
        ones
    }

    /// The words, 64 pages each; bits past `len()` are zero.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The words, mutable. Callers must leave bits past `len()` zero
    /// ([`trim_tail`](Self::trim_tail) restores that).
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Clears any bits past `len()` in the last word.
    pub fn trim_tail(&mut self) {
        let rem = self.pages % BITS_PER_WORD;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }
}

/// Iterator over the marked pages of a [`DirtyBitmap`]: one `trailing_zeros`
/// per marked page, whole zero words skipped at once.
#[derive(Debug, Clone)]
pub struct OnesIter<'a> {
    words: &'a [u64],
    /// Index of the word held in `current`.
    word_index: usize,
    /// Remaining bits of the current word (already masked to the range).
    current: u64,
    end: usize,
}

impl<'a> OnesIter<'a> {
    fn new(words: &'a [u64], start: usize, end: usize) -> Self {
        let word_index = start / BITS_PER_WORD;
        let current = match words.get(word_index) {
            Some(w) if start < end => w & (u64::MAX << (start % BITS_PER_WORD)),
            _ => 0,
        };
        Self {
            words,
            word_index,
            current,
            end,
        }
    }
}

impl Iterator for OnesIter<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        loop {
            if self.current != 0 {
                let bit = self.current.trailing_zeros() as usize;
                let page = self.word_index * BITS_PER_WORD + bit;
                if page >= self.end {
                    self.current = 0;
                    self.word_index = self.words.len();
                    return None;
                }
                self.current &= self.current - 1;
                return Some(page);
            }
            self.word_index += 1;
            if self.word_index * BITS_PER_WORD >= self.end {
                return None;
            }
            self.current = self.words[self.word_index];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn new_bitmap_is_empty() {
        let b = DirtyBitmap::new(130);
        assert_eq!(b.len(), 130);
        assert_eq!(b.words().len(), 3);
        assert_eq!(b.count_ones(), 0);
        assert_eq!(b.iter_ones().next(), None);
    }

    #[test]
    fn set_get_iterate_across_word_boundaries() {
        let mut b = DirtyBitmap::new(200);
        for p in [0, 1, 63, 64, 127, 128, 199] {
            b.set(p);
        }
        assert!(b.get(63) && b.get(64) && !b.get(65) && !b.get(500));
        assert_eq!(
            b.iter_ones().collect::<Vec<_>>(),
            [0, 1, 63, 64, 127, 128, 199]
        );
        assert_eq!(b.count_ones(), 7);
        assert_eq!(b.iter_ones_in(1, 128).collect::<Vec<_>>(), [1, 63, 64, 127]);
        b.unset(64);
        assert!(!b.get(64));
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn set_past_end_panics() {
        DirtyBitmap::new(10).set(10);
    }

    #[test]
    fn runs_are_maximal() {
        let mut b = DirtyBitmap::new(300);
        b.set_range(3, 70);
        b.set(71);
        b.set_range(128, 300);
        assert_eq!(b.iter_runs().collect::<Vec<_>>(), [3..70, 71..72, 128..300]);
    }

    #[test]
    fn or_words_at_drops_bits_past_the_end() {
        let mut b = DirtyBitmap::new(100);
        let n = b.or_words_at(64, &[u64::MAX, u64::MAX]);
        assert_eq!(n, 64);
        assert_eq!(b.count_ones(), 36);
        assert_eq!(b.iter_ones().next(), Some(64));
        assert_eq!(b.iter_ones().last(), Some(99));
    }

    #[test]
    fn merge_is_union() {
        let mut a = DirtyBitmap::new(128);
        let mut b = DirtyBitmap::new(128);
        a.set(1);
        b.set(100);
        a.merge(&b);
        assert_eq!(a.iter_ones().collect::<Vec<_>>(), [1, 100]);
    }

    fn bitmap_and_model(max: usize) -> impl Strategy<Value = (usize, Vec<usize>)> {
        (1..max).prop_flat_map(|len| (Just(len), proptest::collection::vec(0..len, 0..64)))
    }

    proptest! {
        #[test]
        fn behaves_like_a_btreeset((len, pages) in bitmap_and_model(700),
                                   (rs, re) in (0usize..800, 0usize..800),
                                   other in proptest::collection::vec(0usize..700, 0..32)) {
            let mut b = DirtyBitmap::new(len);
            let mut model = BTreeSet::new();
            for &p in &pages { b.set(p); model.insert(p); }
            prop_assert_eq!(b.count_ones(), model.len());
            prop_assert_eq!(b.iter_ones().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            for p in 0..len + 70 { prop_assert_eq!(b.get(p), model.contains(&p)); }

            let (lo, hi) = (rs.min(re), rs.max(re));
            let in_range: Vec<usize> = model.range(lo..hi).copied().collect();
            prop_assert_eq!(b.iter_ones_in(lo, hi).collect::<Vec<_>>(), in_range);

            let mut o = DirtyBitmap::new(len);
            for &p in other.iter().filter(|&&p| p < len) { o.set(p); model.insert(p); }
            b.merge(&o);
            prop_assert_eq!(b.iter_ones().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());

            let (slo, shi) = (lo.min(len), hi.min(len));
            b.set_range(slo, shi);
            model.extend(slo..shi);
            prop_assert_eq!(b.iter_ones().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            let runs: usize = b.iter_runs().map(|r| r.len()).sum();
            prop_assert_eq!(runs, model.len());
        }
    }
}
