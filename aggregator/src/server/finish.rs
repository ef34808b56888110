//! How long a finished server serves the final model.

use std::time::{Duration, Instant};

/// The longest the finish is served past `finish_grace` while devices
/// keep coming for the final model, or keep being refused at the door:
/// a swarm of fresh keys fetching it, or connecting to be refused, keeps
/// the server no longer.
pub(super) const FINISH_EXTENSION_MAX: Duration = Duration::from_secs(600);

/// When a server that finished at `finished` stops serving the final
/// model: `grace` plus the longest wait it tells devices (`horizon`) past
/// the latest of the finish, the start of the last fetch (`active`) and
/// the time by which every device it refused at the handshake limit has
/// come back (`comeback`); never later than `grace` plus
/// [`FINISH_EXTENSION_MAX`] past the finish.
pub(super) fn finish_until(
    finished: Instant,
    grace: Duration,
    active: Option<Instant>,
    comeback: Option<Instant>,
    horizon: Duration,
) -> Instant {
    let latest = [active, comeback]
        .into_iter()
        .flatten()
        .fold(finished, Instant::max);
    (latest + grace + horizon).min(finished + grace + FINISH_EXTENSION_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_and_fetches_extend_the_finish_within_its_cap() {
        let t = Instant::now();
        let (grace, horizon) = (Duration::from_secs(10), Duration::from_secs(3));
        assert_eq!(
            finish_until(t, grace, None, None, horizon),
            t + grace + horizon
        );
        let fetch = t + Duration::from_secs(20);
        let back = t + Duration::from_secs(80);
        assert_eq!(
            finish_until(t, grace, Some(fetch), Some(back), horizon),
            back + grace + horizon,
            "a refused device's comeback outlasts the last fetch"
        );
        // Keys refused (or fetching) without end: the cap holds.
        let forever = t + Duration::from_secs(86_400);
        for (a, c) in [(Some(forever), None), (None, Some(forever))] {
            assert_eq!(
                finish_until(t, grace, a, c, horizon),
                t + grace + FINISH_EXTENSION_MAX
            );
        }
    }
}
