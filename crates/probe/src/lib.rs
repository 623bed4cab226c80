//! The forwarding prober as a sans-IO state machine, in the style of quinn-proto.
//!
//! Every decision the prober makes — which echoes to send and with which ids, when a probe
//! round has failed, when an observer was starved, what its opinion of a gateway or a
//! direct path is — lives here, free of sockets, tasks and clocks. Time comes in as
//! milliseconds from an epoch the driver picks. That is what lets the tests run the real
//! machine for ten simulated minutes over a simulated lossy network in a fraction of a
//! second, and replay any run exactly from its seed: the bugs this machine exists to avoid
//! (a false failover, a starved observer accusing a healthy gateway) are rare events that
//! only long, repeatable runs show.
//!
//! # Driving it
//!
//! The driver owns the ICMP socket and a timer, and is glue only:
//!
//! ```text
//! let mut prober = Prober::new(config, now());
//! loop {
//!     wait until: a reply is readable, the plan's targets changed, or poll_timeout();
//!     let now = now();
//!     if targets changed { prober.set_targets(now, targets) }
//!     // 1. every reply the socket holds, before anything else (non-blocking reads until empty)
//!     while let Some(r) = socket.try_recv() { prober.handle_reply(now, r) }
//!     // 2. then the timer, when it is due
//!     if prober.poll_timeout().is_some_and(|t| t <= now) { prober.handle_timeout(now) }
//!     // 3. send everything asked for, reporting each send that failed at once
//!     while let Some(echo) = prober.poll_transmit() {
//!         if socket.send(echo).is_err() { prober.transmit_failed(echo) }
//!     }
//!     // 4. publish and count
//!     while let Some(event) = prober.poll_event() { ... }
//!     // 5. sleep until poll_timeout() (None: nothing to watch, wait for targets)
//! }
//! ```
//!
//! Why that order:
//!
//! - **Replies before the timer.** A round is judged failed only in
//!   [`Prober::handle_timeout`]; [`Prober::handle_reply`] never judges. So whatever the
//!   socket already holds counts before any deadline is looked at — after a stall, those
//!   are exactly the answers that arrived while the observer was not running. (A driver
//!   that gets this wrong is still not fooled by a stall: the call that notices one moves
//!   every deadline just past `now` and asks to be woken again at once.)
//! - **Every transmit drained, failures reported on the spot.** The probes of a round are
//!   handed out one by one; a send that fails is not part of its round, and a round with
//!   nothing sent is not started, so it cannot fail (the probe address appears only once
//!   the first plan is applied: until then every send fails and nothing is held against
//!   anyone). A round is started when [`Prober::poll_transmit`] returns `None`, or at the
//!   next call into the prober; echoes not handed out by then are dropped.
//! - **`poll_timeout` last.** It is the earliest of the next tick and the next round
//!   deadline; the driver must call [`Prober::handle_timeout`] when it passes. Waking
//!   more than [`STALL_MS`] later than asked is how the prober learns its
//!   observer was not running.

mod config;
mod event;
mod ids;
mod prober;
mod stall;
mod subject;
mod watched;

pub use config::{PROBES_PER_ROUND, ProbeConfig, STARTUP_GRACE_MS};
pub use event::{Echo, Event, Reply};
pub use prober::Prober;
pub use stall::STALL_MS;
pub use subject::{Subject, Targets};
pub use trellis_plan::health::DetectorConfig;
pub use trellis_plan::rounds::RoundConfig;
pub use trellis_plan::{PathTarget, ProbeTarget};
