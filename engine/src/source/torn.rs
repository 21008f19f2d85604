//! The source's side of torn pages (see [`crate::protocol::TornPage`]).
//!
//! A raw page goes from guest memory into the socket without a copy,
//! hashed just before: a guest write between the hash and the kernel's
//! copy tears it. That write came after the page's dirty bit was cleared
//! (chunks are re-protected before their pages are read), so it shows up
//! in a dirty set collected after the round that sent the page. Reports
//! are taken *before* each collect: the write that tore a reported page
//! happened before the destination read it, so before the report came,
//! so before that collect. When the collect is done, every reported page
//! must be in a set collected after its round; one that is not was not
//! written by the guest, and its bytes were corrupted on the way.
//!
//! A live round's verdict waits for the final collect: a write's dirty bit
//! can reach KVM's log after the write itself. On this machine's nested
//! KVM with manual protect and two vCPUs writing, pages torn in round `r`
//! were missing from the next collect in 3 of 4 migrations, and showed up
//! 3-4 collects later (the ring and the plain bitmap passed 4 of 4). So a
//! page no later set holds yet is sent again and kept pending; once the
//! guest is stopped its bits are all in the log, and a page the final
//! collect does not explain either is corruption.
//!
//! Every reported page is sent again in the next round, whatever its hash
//! then (its recorded hash is cleared): the guest may have written it back
//! to the content that was hashed, which skip-unchanged would not resend.

use ferry_dirtylog::DirtyBitmap;

use crate::digest::PageHashes;
use crate::error::MigrationError;
use crate::protocol::{MessageError, TornPage};

/// Which rounds' dirty sets held each page, and the torn pages resent.
pub(crate) struct TornCheck {
    /// Per page: the latest round whose dirty set (collected before it)
    /// held it; 0 when none after round 0 did.
    dirtied_for: Vec<u32>,
    /// Torn pages no set collected after their round held yet.
    pending: Vec<TornPage>,
    /// Torn pages sent again so far.
    resent: u64,
}

/// Which collect a [`TornCheck::settle`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Collect {
    /// One while the guest runs: a torn page no set holds yet may still
    /// have its dirty bit on the way.
    Live,
    /// The one after the guest stopped: every write's bit is in it.
    Final,
}

impl TornCheck {
    /// For a page index space of `pages`.
    pub(crate) fn new(pages: usize) -> Self {
        Self {
            dirtied_for: vec![0; pages],
            pending: Vec::new(),
            resent: 0,
        }
    }

    /// Torn pages sent again so far.
    pub(crate) fn resent(&self) -> u64 {
        self.resent
    }

    /// `set` was just collected, for round `round` (> 0) to send.
    pub(crate) fn note_dirty(&mut self, set: &DirtyBitmap, round: u32) {
        for page in set.iter_ones() {
            if let Some(r) = self.dirtied_for.get_mut(page) {
                *r = round;
            }
        }
    }

    /// Check `reports` (taken before the collect [`TornCheck::note_dirty`]
    /// saw last) and put each page into `next` (the set about to be sent)
    /// with its recorded hash cleared, so it goes out whatever its hash.
    /// After a [`Collect::Live`], a page no later set holds yet stays
    /// pending; after the [`Collect::Final`], such a page, reported now or
    /// pending, is an error. Between rounds only: no encoder may be
    /// recording hashes.
    pub(crate) fn settle(
        &mut self,
        reports: &[TornPage],
        next: &mut DirtyBitmap,
        hashes: &PageHashes,
        collect: Collect,
    ) -> Result<(), MigrationError> {
        for t in reports {
            let page = usize::try_from(t.page)
                .ok()
                .filter(|&p| p < next.len() && p < self.dirtied_for.len());
            let Some(page) = page else {
                return Err(MigrationError::Message(MessageError {
                    message: "RoundWritten",
                    problem: format!("torn page {} is outside guest memory", t.page),
                }));
            };
            if !self.explained(t) {
                self.pending.push(*t);
            }
            next.set(page);
            hashes.set(t.page, 0);
            self.resent += 1;
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending = pending.into_iter().filter(|t| !self.explained(t)).collect();
        match (collect, self.pending.first()) {
            (Collect::Final, Some(t)) => Err(MigrationError::TornPageNotRewritten {
                page: t.page,
                round: t.round,
            }),
            _ => Ok(()),
        }
    }

    /// Whether a set collected after `t`'s round held its page.
    fn explained(&self, t: &TornPage) -> bool {
        usize::try_from(t.page)
            .ok()
            .and_then(|p| self.dirtied_for.get(p))
            .is_some_and(|&r| r > t.round)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(pages: usize, ones: &[usize]) -> DirtyBitmap {
        let mut set = DirtyBitmap::new(pages);
        for &p in ones {
            set.set(p);
        }
        set
    }

    #[test]
    fn a_torn_page_written_again_later_is_resent_whatever_its_hash() {
        let hashes = PageHashes::new(128);
        hashes.set(5, 77);
        let mut check = TornCheck::new(128);
        // Round 1's set (collected after round 0 sent page 5) holds it.
        check.note_dirty(&set_of(128, &[5, 9]), 1);
        // Round 1 already went (page 5 skipped as unchanged, say); the
        // report comes before round 2's collect, which does not hold it.
        let mut next = set_of(128, &[9]);
        check.note_dirty(&next, 2);
        check
            .settle(
                &[TornPage { page: 5, round: 0 }],
                &mut next,
                &hashes,
                Collect::Live,
            )
            .unwrap();
        assert!(next.get(5), "sent again");
        assert_eq!(hashes.get(5), 0, "whatever its hash");
        assert_eq!(hashes.digest(), 0);
        assert_eq!(check.resent(), 1);
    }

    /// Page 5 dirty for round 1 (and sent then) and torn in it; the set
    /// collected for round 2 (returned, about to be sent) does not hold it.
    fn torn_in_round_1_unexplained() -> (PageHashes, TornCheck, DirtyBitmap) {
        let hashes = PageHashes::new(128);
        let mut check = TornCheck::new(128);
        check.note_dirty(&set_of(128, &[5]), 1);
        let next = set_of(128, &[6]);
        check.note_dirty(&next, 2);
        (hashes, check, next)
    }

    const TORN_5_IN_1: TornPage = TornPage { page: 5, round: 1 };

    fn assert_page_5_corrupted(err: &MigrationError) {
        assert!(
            matches!(
                err,
                MigrationError::TornPageNotRewritten { page: 5, round: 1 }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("did not write it again"), "{err}");
    }

    #[test]
    fn a_torn_page_no_later_set_holds_is_corruption() {
        let (hashes, mut check, mut next) = torn_in_round_1_unexplained();
        let err = check
            .settle(&[TORN_5_IN_1], &mut next, &hashes, Collect::Final)
            .unwrap_err();
        assert_page_5_corrupted(&err);
    }

    #[test]
    fn a_torn_page_whose_bit_comes_late_is_resent_and_settled_by_a_later_set() {
        // Its dirty bit was still on the way at round 2's collect: sent
        // again, pending.
        let (hashes, mut check, mut next) = torn_in_round_1_unexplained();
        check
            .settle(&[TORN_5_IN_1], &mut next, &hashes, Collect::Live)
            .unwrap();
        assert!(next.get(5), "sent again at once");
        // The set for round 3 holds it: explained, and the final collect
        // has nothing left to refuse.
        let mut next = set_of(128, &[5]);
        check.note_dirty(&next, 3);
        check
            .settle(&[], &mut next, &hashes, Collect::Live)
            .unwrap();
        let mut last = DirtyBitmap::new(128);
        check.note_dirty(&last, 4);
        check
            .settle(&[], &mut last, &hashes, Collect::Final)
            .unwrap();
        assert_eq!(check.resent(), 1);
    }

    #[test]
    fn a_pending_torn_page_the_final_set_does_not_hold_is_corruption() {
        let (hashes, mut check, mut next) = torn_in_round_1_unexplained();
        check
            .settle(&[TORN_5_IN_1], &mut next, &hashes, Collect::Live)
            .unwrap();
        // Sent again in round 2 (in `next`, not a collected set); the
        // guest stops and the final collect does not hold it either.
        let mut last = set_of(128, &[9]);
        check.note_dirty(&last, 3);
        let err = check
            .settle(&[], &mut last, &hashes, Collect::Final)
            .unwrap_err();
        assert_page_5_corrupted(&err);
    }

    #[test]
    fn a_torn_page_outside_memory_is_refused() {
        let hashes = PageHashes::new(128);
        let mut check = TornCheck::new(128);
        let mut next = DirtyBitmap::new(128);
        for page in [128, u64::MAX] {
            let err = check
                .settle(
                    &[TornPage { page, round: 0 }],
                    &mut next,
                    &hashes,
                    Collect::Live,
                )
                .unwrap_err();
            assert!(matches!(err, MigrationError::Message(_)), "{err:?}");
        }
    }
}
