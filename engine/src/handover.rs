//! How a handover always ends: the destination's record of what it did with
//! each migration's GO, the source's question over a fresh connection when
//! the answer to GO got lost, and the operator's last word when the
//! destination cannot be reached at all.
//!
//! The destination decides exactly once per migration, under one lock:
//! either it resumes the guest (on GO) or it refuses for good (it aborted,
//! its source went away, or someone asked before GO came). A `Resolve`
//! question about a migration still undecided decides it: refused. So an
//! answer, once given, never changes, and the source can act on it: resume
//! its own copy on "not resumed", let go of it on "resumed".
//!
//! | destination state | event | next state | answer to `Resolve` |
//! |---|---|---|---|
//! | (none) | Hello accepted | open | - |
//! | open | GO, resume works | resumed | `Running` |
//! | open | GO, resume fails / GO corrupt / source gone / no GO in time / Abort | refused | `Abort` |
//! | open | `Resolve` | refused | `Abort` |
//! | resumed | anything | resumed | `Running` (the same payload) |
//! | refused | GO | refused (the GO is answered with `Abort`) | `Abort` |
//! | unknown id | `Resolve` | - | `Abort` (no such guest here) |
//!
//! A destination host that may no longer run guests (a cluster agent that
//! fenced itself: its lease could not be renewed) [`HandoverRecord::hold`]s
//! its record: while held, every GO is refused for good as above, until
//! [`HandoverRecord::release`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_transport::{FrameKind, Lanes, TransportError};

use crate::protocol::{self, Running};
use crate::vm::MigratableVm;

/// Opens a fresh lane session to the destination of a migration (the same
/// address and security as the migration's own lanes; one lane is enough).
/// Called from a helper thread and given up on after a bounded wait, so it
/// may block.
pub type Reconnect = Box<dyn FnMut() -> Result<Lanes, TransportError> + Send>;

/// Migrations a destination remembers the outcome of (the oldest are
/// forgotten first; a source asks within seconds).
pub const OUTCOMES_KEPT: usize = 64;

/// What a destination did with a migration's GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoverOutcome {
    /// The guest runs at the destination.
    Resumed(Running),
    /// The destination did not resume the guest and never will; why.
    NotResumed(String),
}

#[derive(Debug, Clone)]
enum State {
    Open,
    Resumed(Running),
    Refused(String),
}

/// A destination's record of its migrations' handovers, shared between the
/// thread that receives a migration and whoever answers `Resolve`
/// questions (clone it: the clones share one record). Keep one per
/// destination process, for as long as the process listens.
#[derive(Debug, Clone, Default)]
pub struct HandoverRecord {
    inner: Arc<Mutex<Entries>>,
}

#[derive(Debug, Default)]
struct Entries {
    entries: VecDeque<(u64, State)>,
    /// Why every GO is refused now, while held.
    held: Option<String>,
}

impl HandoverRecord {
    fn with<T>(&self, f: impl FnOnce(&mut VecDeque<(u64, State)>) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()).entries)
    }

    /// From now on every GO is refused for good with `reason` (this host
    /// may not run guests: e.g. it fenced itself), until
    /// [`HandoverRecord::release`]. A guest already resumed stays so.
    pub fn hold(&self, reason: &str) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).held = Some(reason.to_owned());
    }

    /// GOs are answered again (migrations refused meanwhile stay refused).
    pub fn release(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).held = None;
    }

    /// A migration was accepted: undecided.
    pub(crate) fn open(&self, id: u64) {
        self.with(|e| {
            e.retain(|(i, _)| *i != id);
            if e.len() >= OUTCOMES_KEPT {
                e.pop_front();
            }
            e.push_back((id, State::Open));
        });
    }

    /// The destination gives up on migration `id` (no-op once resumed).
    pub(crate) fn refuse(&self, id: u64, reason: &str) {
        self.with(|e| {
            if let Some((_, s)) = e.iter_mut().find(|(i, _)| *i == id) {
                if matches!(s, State::Open) {
                    *s = State::Refused(reason.to_owned());
                }
            }
        });
    }

    /// GO came: run `resume` if migration `id` is still undecided, and
    /// record what it gave. `Err(reason)` without running it when the
    /// migration was already refused (e.g. a `Resolve` came first) or the
    /// record is held ([`HandoverRecord::hold`]; the migration is then
    /// refused for good).
    pub(crate) fn resume_with<E: std::fmt::Display>(
        &self,
        id: u64,
        resume: impl FnOnce() -> Result<Running, E>,
    ) -> Result<Result<Running, E>, String> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Entries { entries, held } = &mut *inner;
        let Some((_, s)) = entries.iter_mut().find(|(i, _)| *i == id) else {
            return Err(format!("migration {id:#x} is not open here"));
        };
        if let (State::Open, Some(why)) = (&*s, held.as_deref()) {
            *s = State::Refused(why.to_owned());
        }
        match s {
            State::Open => {
                let got = resume();
                *s = match &got {
                    Ok(running) => State::Resumed(*running),
                    Err(err) => State::Refused(format!("resuming failed: {err}")),
                };
                Ok(got)
            }
            State::Resumed(_) => Err(format!("migration {id:#x} already resumed")),
            State::Refused(why) => Err(why.clone()),
        }
    }

    /// The answer to "did you resume migration `id`?". An undecided
    /// migration is refused by the question itself, so the answer never
    /// changes afterwards.
    pub fn answer(&self, id: u64) -> HandoverOutcome {
        self.with(|e| match e.iter_mut().find(|(i, _)| *i == id) {
            None => HandoverOutcome::NotResumed(format!(
                "no migration {id:#x} is known here (this destination never resumed it)"
            )),
            Some((_, s)) => {
                if matches!(s, State::Open) {
                    *s = State::Refused(
                        "the source asked for the outcome before GO arrived".to_owned(),
                    );
                }
                match s {
                    State::Resumed(r) => HandoverOutcome::Resumed(*r),
                    State::Refused(why) => HandoverOutcome::NotResumed(why.clone()),
                    State::Open => unreachable!("refused just above"),
                }
            }
        })
    }
}

/// Why the source could not learn the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unreachable(pub String);

/// Ask the destination over a fresh session whether it resumed migration
/// `id`, trying again until `until` while it cannot be reached.
pub(crate) fn ask(
    reconnect: &Arc<Mutex<Reconnect>>,
    id: u64,
    until: Instant,
) -> Result<HandoverOutcome, Unreachable> {
    let mut last = String::from("no attempt fitted in the time allowed");
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Unreachable(last));
        }
        match ask_once(reconnect, id, left) {
            Ok(outcome) => return Ok(outcome),
            Err(why) => last = why,
        }
        std::thread::sleep(RETRY_PAUSE.min(until.saturating_duration_since(Instant::now())));
    }
}

/// Between two attempts to reach the destination.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// One attempt, on a helper thread given up on after `within`.
fn ask_once(
    reconnect: &Arc<Mutex<Reconnect>>,
    id: u64,
    within: Duration,
) -> Result<HandoverOutcome, String> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let reconnect = Arc::clone(reconnect);
    let until = Instant::now() + within;
    std::thread::Builder::new()
        .name("ferry-resolve".into())
        .spawn(move || {
            let got = (|| {
                let lanes = {
                    // A previous attempt's thread that overran still holds
                    // the lock: this attempt fails with it.
                    let mut connect = reconnect
                        .try_lock()
                        .map_err(|_| "an earlier attempt is still connecting".to_owned())?;
                    (connect)().map_err(|e| crate::source::error_chain(&e))?
                };
                query(lanes, id, until)
            })();
            let _ = tx.send(got);
        })
        .map_err(|e| format!("could not start a thread: {e}"))?;
    match rx.recv_deadline(until) {
        Ok(got) => got,
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

/// Send `Resolve(id)` on lane 0 of `lanes` and read the answer.
///
/// One frame each way on a fresh session, on a thread that exists only to
/// ask: the lane's own synchronous exchange
/// ([`ferry_transport::Lane::request`], the one the lane handshake makes),
/// whose framing seals the question and verifies the answer, the read
/// timing out at `until`. The transport's path for streams
/// (`Lanes::into_ends`, `LaneQueues`, `LaneInbox`) would start a writer
/// and a reader thread, with their queues, for these two frames.
fn query(mut lanes: Lanes, id: u64, until: Instant) -> Result<HandoverOutcome, String> {
    let lane = lanes.lane_mut(0).ok_or("the session has no lane")?;
    let left = until.saturating_duration_since(Instant::now());
    let answer = lane.request(FrameKind::Resolve, &protocol::encode_u64(id), left);
    if let Ok(closer) = lane.closer() {
        closer.close();
    }
    let frame = answer.map_err(|e| crate::source::error_chain(&e))?;
    match frame.kind {
        FrameKind::Running => Running::decode(&frame.payload)
            .map(HandoverOutcome::Resumed)
            .map_err(|e| e.to_string()),
        FrameKind::Abort => Ok(HandoverOutcome::NotResumed(protocol::decode_reason(
            &frame.payload,
        ))),
        other => Err(format!("the destination answered with a {other} frame")),
    }
}

/// An operator's (or a cluster's) decision for a handover left in doubt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InDoubtDecision {
    /// Run the guest here again (refused while the destination is
    /// reachable and runs it).
    Resume,
    /// The guest lives at the destination: this copy is thrown away.
    Discard,
}

/// What [`resolve_in_doubt`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InDoubtResolution {
    /// The guest runs here again. `destination` says what the destination
    /// answered, or why it could not be asked.
    ResumedHere {
        /// The destination's answer or why there was none.
        destination: String,
    },
    /// This copy is to be thrown away (the caller drops it).
    Discarded,
}

/// Why [`resolve_in_doubt`] refused.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The destination answered that it runs the guest: resuming here too
    /// would run it twice.
    #[error("the destination is reachable and runs the guest (it resumed it): resuming here would run it twice; discard this copy instead")]
    RunsAtDestination,
    /// Resuming the local copy failed.
    #[error("could not resume the guest here")]
    Resume(#[source] crate::vm::VmOpError),
}

/// Finish a handover left in doubt ([`crate::MigrationError::InDoubt`]): the
/// source guest is paused, the destination could not be reached.
///
/// `Resume` first asks the destination (when `reconnect` is given, for at
/// most `ask_for`): if it runs the guest the request is refused; if it
/// answers that it did not resume, or cannot be reached, the guest resumes
/// here. `Discard` asks nothing: the caller drops its copy.
pub fn resolve_in_doubt(
    vm: &dyn MigratableVm,
    migration_id: u64,
    decision: InDoubtDecision,
    reconnect: Option<Reconnect>,
    ask_for: Duration,
) -> Result<InDoubtResolution, ResolveError> {
    match decision {
        InDoubtDecision::Discard => Ok(InDoubtResolution::Discarded),
        InDoubtDecision::Resume => {
            let destination = match reconnect {
                None => "not asked (no way to reach it was given)".to_owned(),
                Some(r) => {
                    let r = Arc::new(Mutex::new(r));
                    match ask(&r, migration_id, Instant::now() + ask_for) {
                        Ok(HandoverOutcome::Resumed(_)) => {
                            return Err(ResolveError::RunsAtDestination)
                        }
                        Ok(HandoverOutcome::NotResumed(why)) => {
                            format!("it did not resume the guest: {why}")
                        }
                        Err(Unreachable(why)) => format!("unreachable: {why}"),
                    }
                }
            };
            vm.set_throttle(0);
            vm.resume().map_err(ResolveError::Resume)?;
            Ok(InDoubtResolution::ResumedHere { destination })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> Running {
        Running {
            resumed_at_unix_ns: 1,
            verify_ns: 2,
            restore_ns: 3,
            resume_ns: 4,
            pages_written_at_unix_ns: 5,
            ready_sent_at_unix_ns: 6,
        }
    }

    #[test]
    fn a_resumed_migration_answers_resumed_for_good() {
        let r = HandoverRecord::default();
        r.open(7);
        let got = r.resume_with(7, || Ok::<_, String>(running())).unwrap();
        assert_eq!(got, Ok(running()));
        r.refuse(7, "late failure");
        assert_eq!(r.answer(7), HandoverOutcome::Resumed(running()));
        assert_eq!(r.answer(7), HandoverOutcome::Resumed(running()));
    }

    #[test]
    fn a_question_before_go_refuses_the_migration_and_go_then_fails() {
        let r = HandoverRecord::default();
        r.open(7);
        assert!(matches!(r.answer(7), HandoverOutcome::NotResumed(_)));
        let mut ran = false;
        let got = r.resume_with(7, || {
            ran = true;
            Ok::<_, String>(running())
        });
        assert!(got.is_err() && !ran, "a refused migration never resumes");
        assert!(matches!(r.answer(7), HandoverOutcome::NotResumed(_)));
    }

    #[test]
    fn a_held_record_refuses_go_for_good_until_released() {
        let r = HandoverRecord::default();
        r.open(5);
        r.open(6);
        r.resume_with(6, || Ok::<_, String>(running()))
            .unwrap()
            .unwrap();
        r.hold("this host is fenced");
        let mut ran = false;
        let got = r.resume_with(5, || {
            ran = true;
            Ok::<_, String>(running())
        });
        assert_eq!(got, Err("this host is fenced".to_owned()));
        assert!(!ran, "a held record resumes nothing");
        assert_eq!(r.answer(6), HandoverOutcome::Resumed(running()));
        r.release();
        assert!(
            r.resume_with(5, || Ok::<_, String>(running())).is_err(),
            "refused while held stays refused"
        );
        assert_eq!(
            r.answer(5),
            HandoverOutcome::NotResumed("this host is fenced".into())
        );
        r.open(8);
        assert!(r
            .resume_with(8, || Ok::<_, String>(running()))
            .unwrap()
            .is_ok());
    }

    #[test]
    fn a_refused_migration_stays_refused_with_its_reason() {
        let r = HandoverRecord::default();
        r.open(9);
        r.refuse(9, "digest mismatch");
        assert_eq!(
            r.answer(9),
            HandoverOutcome::NotResumed("digest mismatch".into())
        );
    }

    #[test]
    fn a_failed_resume_is_recorded_as_not_resumed() {
        let r = HandoverRecord::default();
        r.open(3);
        let got = r
            .resume_with(3, || Err::<Running, _>("vCPU failed"))
            .unwrap();
        assert!(got.is_err());
        assert!(
            matches!(r.answer(3), HandoverOutcome::NotResumed(why) if why.contains("vCPU failed"))
        );
    }

    #[test]
    fn unknown_migrations_are_not_resumed_and_old_ones_are_forgotten() {
        let r = HandoverRecord::default();
        assert!(matches!(r.answer(1), HandoverOutcome::NotResumed(_)));
        for id in 1..=(OUTCOMES_KEPT as u64 + 1) {
            r.open(id);
        }
        assert_eq!(r.with(|e| e.len()), OUTCOMES_KEPT);
        assert!(r.with(|e| e.iter().all(|(i, _)| *i != 1)));
    }
}
