//! How often to probe and how to judge the answers.

use trellis_plan::health::{DetectorConfig, HANDSHAKE_RETRY_MS};
use trellis_plan::rounds::RoundConfig;

/// Probes per round, for gateways and direct paths alike. A round fails only if every one
/// is lost: at 5 % loss per lossy point a relayed probe crosses eight of them and is lost a
/// third of the time, so four independent probes make a failed round a 1 % event and three
/// failed rounds in a row a one-in-a-million one, while a real fault still fails every
/// probe. A direct-path probe crosses four, so its rounds fail a thousand times less often.
pub const PROBES_PER_ROUND: usize = 4;

/// How long a subject that has never answered is given before its failed rounds count,
/// from the first probe actually sent to it: three WireGuard handshake retries and a
/// round trip.
///
/// Until the first answer, silence says little about a path: the tunnel under it carries
/// nothing until its first handshake completes, an initiation is dropped outright while
/// the peer's agent has not applied a plan naming this node yet, and at 5 % loss per lossy
/// point any attempt fails 18.5 % of the time (four crossings); the next one comes only
/// REKEY_TIMEOUT plus jitter (5–5.33 s) later. The plan's default of 7 s, counted from
/// when the subject was added, covers one retry: on the simulated lab at 5 % loss it broke
/// a direct path in 1–8 % of cluster starts when agents apply their first plan within
/// 1–5 s of registering, and in half of them within 10 s. This grace broke none of 1,800
/// such starts (one of 600 at 10 s; see the crate's `false_breaks` tests). The cost falls
/// only on a subject that never worked at all, declared down after this grace instead of
/// 7 s; one that has answered once is judged at once, so a real cut is still seen in under
/// half a second.
pub const STARTUP_GRACE_MS: u64 = 3 * HANDSHAKE_RETRY_MS + 1_000;

/// The prober's settings. Start from [`ProbeConfig::default`] and override what the
/// command line sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    /// A round of probes goes to every subject this often.
    pub interval_ms: u64,
    pub rounds: RoundConfig,
    pub detector: DetectorConfig,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            interval_ms: 100,
            rounds: RoundConfig::default(),
            detector: DetectorConfig {
                startup_grace_ms: STARTUP_GRACE_MS,
                ..DetectorConfig::default()
            },
        }
    }
}
