//! A seeded, frame-aware fault proxy for ferry lane sessions (plaintext):
//! it forwards every connection to one target and, on the connection and
//! in the direction a [`Fault`] names, damages the stream once: at a byte
//! offset or at the first frame of a kind, it cuts, flips a bit,
//! truncates, stalls (holds the connection open, forwarding nothing, for
//! a while), or holds the frame until the test releases it
//! ([`FaultProxy::release`]). Faults are drawn from a seed
//! ([`Fault::draw`]) so a failing trial can be replayed.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_transport::{FrameKind, HEADER_LEN};

/// The seeded generator faults are drawn from (`Rng::with_seed`).
pub use fastrand::Rng;

/// Which way the damaged bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Source to destination.
    ToDestination,
    /// Destination to source.
    ToSource,
}

/// Where on the stream the fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// After this many bytes of the direction.
    Byte(u64),
    /// At the first frame of this kind.
    Frame(FrameKind),
}

/// What the fault does there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Close both sides of the connection.
    Cut,
    /// Flip one bit, then go on.
    Flip,
    /// Forward half of what comes next, then close.
    Truncate,
    /// Forward nothing more in this direction for this long (the connection
    /// stays open), then close.
    Stall(Duration),
    /// Hold the frame (the connection open, nothing more forwarded in this
    /// direction) and close every connection accepted meanwhile, until
    /// [`FaultProxy::release`]; then forward it and go on.
    Hold,
}

/// One fault of a trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Accepted connection it applies to (0 = the first lane of the first
    /// session).
    pub connection: usize,
    /// Which way.
    pub direction: Direction,
    /// Where.
    pub place: Place,
    /// What.
    pub action: Action,
}

impl Fault {
    /// A fault drawn from `rng` for a session of `lanes` lanes moving about
    /// `stream_bytes` towards the destination: frame faults on lane 0's
    /// control frames (the handover's included) or byte faults at a random
    /// offset of a random lane, either way.
    pub fn draw(rng: &mut Rng, lanes: usize, stream_bytes: u64) -> Fault {
        let action = *pick(
            rng,
            &[
                Action::Cut,
                Action::Flip,
                Action::Truncate,
                Action::Stall(Duration::from_secs(3)),
            ],
        );
        if rng.bool() {
            let (direction, kind) = *pick(
                rng,
                &[
                    (Direction::ToDestination, FrameKind::Hello),
                    (Direction::ToDestination, FrameKind::VcpuState),
                    (Direction::ToDestination, FrameKind::Digest),
                    (Direction::ToDestination, FrameKind::Go),
                    (Direction::ToSource, FrameKind::HelloAck),
                    (Direction::ToSource, FrameKind::Ready),
                    (Direction::ToSource, FrameKind::Running),
                ],
            );
            Fault {
                connection: 0,
                direction,
                place: Place::Frame(kind),
                action,
            }
        } else {
            let direction = if rng.u8(..4) == 0 {
                Direction::ToSource
            } else {
                Direction::ToDestination
            };
            let limit = match direction {
                Direction::ToDestination => stream_bytes,
                // The destination sends only a few small frames.
                Direction::ToSource => 120,
            };
            Fault {
                connection: rng.usize(..lanes.max(1)),
                direction,
                place: Place::Byte(rng.u64(..limit.max(1))),
                action,
            }
        }
    }
}

/// One of `items` (not empty).
pub fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

/// What runs the moment the fault strikes (see [`FaultProxy::on_strike`]).
type StrikeHook = Box<dyn FnOnce() + Send>;

/// Whether the fault struck, and when; a held frame's gate.
#[derive(Default)]
struct Struck {
    at: Mutex<Option<Instant>>,
    hook: Mutex<Option<StrikeHook>>,
    /// Holding: a frame is held ([`Action::Hold`]) and not yet released.
    holding: Mutex<bool>,
    released: Condvar,
}

impl Struck {
    fn strike(&self, hold: bool) {
        *lock(&self.at) = Some(Instant::now());
        *lock(&self.holding) = hold;
        if let Some(hook) = lock(&self.hook).take() {
            hook();
        }
    }

    fn holding(&self) -> bool {
        *lock(&self.holding)
    }

    /// Waits until the held frame is released (or the proxy stops).
    fn wait_release(&self, stop: &AtomicBool) {
        let mut holding = lock(&self.holding);
        while *holding && !stop.load(Ordering::Acquire) {
            holding = self
                .released
                .wait_timeout(holding, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn release(&self) {
        *lock(&self.holding) = false;
        self.released.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The proxy: a loopback listener; stops accepting when dropped (the
/// relays end when their peers close).
pub struct FaultProxy {
    /// Where sources connect.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    struck: Arc<Struck>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl FaultProxy {
    /// Forwards connections to `target`, damaging as `fault` says.
    pub fn spawn(target: SocketAddr, fault: Fault) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let struck = Arc::new(Struck::default());
        let open = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let (stop2, struck2, open2) = (stop.clone(), struck.clone(), open.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Acquire) {
                let (client, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                if struck2.holding() {
                    // Nothing reaches the target while a frame is held.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let index = count.fetch_add(1, Ordering::AcqRel);
                {
                    let mut o = open2.lock().unwrap_or_else(|p| p.into_inner());
                    o.extend(client.try_clone());
                    o.extend(server.try_clone());
                }
                for (direction, from, to) in [
                    (
                        Direction::ToDestination,
                        client.try_clone(),
                        server.try_clone(),
                    ),
                    (Direction::ToSource, server.try_clone(), client.try_clone()),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let mine = (fault.connection == index && fault.direction == direction)
                        .then_some(fault);
                    let (struck, stop) = (struck2.clone(), stop2.clone());
                    std::thread::spawn(move || relay(from, to, mine, &struck, &stop));
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            struck,
            open,
        })
    }

    /// When the fault struck, if it did.
    pub fn struck_at(&self) -> Option<Instant> {
        *lock(&self.struck.at)
    }

    /// Runs `hook` the moment the fault strikes, before the damaged frame
    /// goes on (or is held): to change the world around the connection at
    /// that exact point.
    pub fn on_strike(&self, hook: impl FnOnce() + Send + 'static) {
        *lock(&self.struck.hook) = Some(Box::new(hook));
    }

    /// Forwards a frame held by [`Action::Hold`], and connections again.
    pub fn release(&self) {
        self.struck.release();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.struck.released.notify_all();
        for s in self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` frame by frame, applying `fault` once.
fn relay(
    mut from: TcpStream,
    mut to: TcpStream,
    fault: Option<Fault>,
    struck: &Struck,
    stop: &AtomicBool,
) {
    let mut passed = 0u64;
    let mut done = fault.is_none();
    let mut header = [0u8; HEADER_LEN];
    loop {
        if from.read_exact(&mut header).is_err() {
            break;
        }
        let len = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")) as usize;
        let mut frame = header.to_vec();
        frame.resize(HEADER_LEN + len.min(64 << 20), 0);
        if from.read_exact(&mut frame[HEADER_LEN..]).is_err() {
            break;
        }
        let kind = u16::from_le_bytes([header[6], header[7]]);
        if !done {
            let f = fault.expect("not done means a fault");
            let at = match f.place {
                Place::Frame(k) if k.to_wire() == kind => Some(0usize),
                Place::Byte(n) if passed + frame.len() as u64 > n => {
                    Some(usize::try_from(n - passed).unwrap_or(0))
                }
                _ => None,
            };
            if let Some(at) = at {
                done = true;
                struck.strike(f.action == Action::Hold);
                match f.action {
                    Action::Cut => {
                        let _ = to.write_all(&frame[..at]);
                        break;
                    }
                    Action::Flip => {
                        // A frame fault damages the checksum; a byte fault
                        // the byte at its offset.
                        let i = if matches!(f.place, Place::Frame(_)) {
                            16
                        } else {
                            at
                        };
                        frame[i] ^= 0x20;
                    }
                    Action::Truncate => {
                        let keep = at + (frame.len() - at) / 2;
                        let _ = to.write_all(&frame[..keep]);
                        break;
                    }
                    Action::Stall(d) => {
                        let _ = to.write_all(&frame[..at]);
                        std::thread::sleep(d);
                        break;
                    }
                    Action::Hold => {
                        struck.wait_release(stop);
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                    }
                }
            }
        }
        passed += frame.len() as u64;
        if to.write_all(&frame).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_draws_the_same_faults() {
        let draw = |seed| {
            let mut r = Rng::with_seed(seed);
            (0..8)
                .map(|_| Fault::draw(&mut r, 2, 1 << 20))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
