//! Background work yields to clients: a byte budget for shard sync, blob recovery and serving
//! peers, closed on the latency clients see.
//!
//! Background work calls [`BackgroundThrottle::acquire`] with the bytes it is about to move; a
//! token bucket lets it through at the current rate. Every `interval_ms` the controller looks at
//! the foreground RPCs that ended in the window, method by method, and compares each method's
//! p99 with its quiet reference: its p99 while background ran at most at its floor, learned in
//! such windows (a moving average). Above `max_slowdown` times the reference, the rate drops to
//! `DECREASE` of what background actually used; otherwise it grows by `INCREASE`, to at most
//! `HEADROOM` times what background used lately, until it no longer binds. Clients of a method with no
//! reference yet (a node started busy) quiet the background to its floor until one is learned,
//! and a node starts at its floor; a window without clients lifts the limit. A fixed MB/s cap is either too slow for an idle
//! node or too fast for a busy one; this one follows the load, and changes live with the
//! configuration.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus::{Gauge, Registry};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::{ConfigError, Validate, invalid};

/// Multiplicative decrease, of the rate background used in the window.
const DECREASE: f64 = 0.7;
/// Multiplicative increase per window without pressure.
const INCREASE: f64 = 1.25;
/// While clients are served the budget grows to at most this many times what background used.
const HEADROOM: f64 = 2.0;
/// Above this the budget does not bind and is dropped (unlimited).
const UNLIMITED_ABOVE: f64 = 64.0 * 1024.0 * 1024.0 * 1024.0;
/// Weight of a new idle window in the idle latency's moving average.
const IDLE_WEIGHT: f64 = 0.2;
/// Weight of a new window in the moving average of what background used (about a second of
/// 250 ms windows): work that moves in lumps (a catch-up charges 64 certificates at once) leaves
/// most windows empty, and growth capped by one window's use would hold it at the floor.
const USE_WEIGHT: f64 = 0.25;
/// RPCs a method's p99 is taken over, quiet or busy: a window of a slow method holds only a few,
/// and the worst of three set against a reference learned as the worst of eight reads low.
const MIN_SAMPLES: usize = 8;
/// Background within this factor of its floor counts as quiet.
const QUIET_MARGIN: f64 = 1.05;
/// A burst the bucket lets through at once, in seconds of the current rate.
const BURST_SECS: f64 = 0.05;

/// `[throttle]` of the sync-service configuration. Applied live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Close background work on foreground latency. Off, background runs unthrottled (a
    /// `stream.max_bytes_per_sec` cap still applies).
    pub enabled: bool,
    /// How much slower than idle the foreground p99 may get before background backs off.
    pub max_slowdown: f64,
    /// Background never gets less than this (bytes/s), so syncs and recovery always progress.
    pub min_bytes_per_sec: u64,
    /// The controller's window.
    pub interval_ms: u64,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig { enabled: true, max_slowdown: 1.2, min_bytes_per_sec: 4 * 1024 * 1024, interval_ms: 250 }
    }
}

impl Validate for ThrottleConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(self.max_slowdown.is_finite() && self.max_slowdown >= 1.0) {
            return Err(invalid("throttle.max_slowdown", "must be a number of at least 1.0"));
        }
        if self.min_bytes_per_sec == 0 {
            return Err(invalid("throttle.min_bytes_per_sec", "must be positive, or background work could stall"));
        }
        if !(10..=60_000).contains(&self.interval_ms) {
            return Err(invalid("throttle.interval_ms", "must be between 10 and 60000"));
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct MethodWindow {
    /// This window's latencies (seconds).
    samples: Vec<f64>,
    /// Latencies from quiet windows, kept until there are enough to learn from.
    quiet: Vec<f64>,
    /// Latencies from busy windows, kept until there are enough to judge by.
    busy: Vec<f64>,
    /// The method's p99 when background is quiet: a moving average over quiet windows.
    reference: Option<f64>,
}

fn p99(mut samples: Vec<f64>) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let at = ((samples.len() as f64 * 0.99).ceil() as usize).clamp(1, samples.len()) - 1;
    samples.get(at).copied()
}

#[derive(Debug)]
struct State {
    config: ThrottleConfig,
    /// Bytes per second background may use; `None` = unlimited.
    rate: Option<f64>,
    tokens: f64,
    refilled: Instant,
    used_in_window: u64,
    /// What background used lately (bytes/s), a moving average over windows.
    recent_use: f64,
    methods: HashMap<&'static str, MethodWindow>,
    /// The last window's worst p99 over its idle reference.
    slowdown: f64,
}

/// What one controller step decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// The new rate (bytes/s); `None` = unlimited.
    pub rate: Option<f64>,
    /// The worst method's p99 over its idle reference (1.0 when none could be judged).
    pub slowdown: f64,
}

/// The budget background work draws from. One per node process, shared by every path that
/// moves background bytes.
pub struct BackgroundThrottle {
    state: Mutex<State>,
    rate_gauge: Gauge,
    slowdown_gauge: Gauge,
    enabled_gauge: Gauge,
}

impl BackgroundThrottle {
    /// A throttle registering `ferry_background_rate_bytes_per_second` and
    /// `ferry_foreground_slowdown` and `ferry_background_throttle_enabled` in `registry`.
    pub fn new(config: ThrottleConfig, registry: &Registry) -> Result<Arc<Self>, prometheus::Error> {
        let rate_gauge = Gauge::new(
            "ferry_background_rate_bytes_per_second",
            "Bytes per second background work (shard sync, blob recovery, serving peers) may move now; 0 = unlimited.",
        )?;
        let slowdown_gauge = Gauge::new(
            "ferry_foreground_slowdown",
            "The last throttle window's worst foreground p99 over the same method's idle p99.",
        )?;
        let enabled_gauge = Gauge::new(
            "ferry_background_throttle_enabled",
            "1 while the background throttle is on (throttle.enabled).",
        )?;
        enabled_gauge.set(if config.enabled { 1.0 } else { 0.0 });
        // A node that starts knows nothing of its clients yet: background starts at its floor
        // until the first window says whether anyone is served.
        let rate = config.enabled.then_some(config.min_bytes_per_sec as f64);
        rate_gauge.set(rate.unwrap_or(0.0));
        registry.register(Box::new(rate_gauge.clone()))?;
        registry.register(Box::new(slowdown_gauge.clone()))?;
        registry.register(Box::new(enabled_gauge.clone()))?;
        Ok(Arc::new(BackgroundThrottle {
            state: Mutex::new(State {
                config,
                rate,
                tokens: 0.0,
                refilled: Instant::now(),
                used_in_window: 0,
                recent_use: 0.0,
                methods: HashMap::new(),
                slowdown: 1.0,
            }),
            rate_gauge,
            slowdown_gauge,
            enabled_gauge,
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state holds plain numbers: a panic elsewhere cannot leave it half-updated in a
        // way that matters, so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the configuration (a live reload). Turning the throttle off lifts the limit at
    /// once.
    pub fn set_config(&self, config: ThrottleConfig) {
        self.enabled_gauge.set(if config.enabled { 1.0 } else { 0.0 });
        let mut s = self.state();
        if !config.enabled {
            s.rate = None;
        }
        s.config = config;
    }

    /// The configuration in force.
    pub fn config(&self) -> ThrottleConfig {
        self.state().config.clone()
    }

    /// The controller's window.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.state().config.interval_ms)
    }

    /// Records a foreground RPC that took `elapsed`.
    pub fn record_foreground(&self, method: &'static str, elapsed: Duration) {
        let mut s = self.state();
        let window = s.methods.entry(method).or_default();
        // Bounded: a window keeps at most this many samples (plenty for a p99).
        if window.samples.len() < 100_000 {
            window.samples.push(elapsed.as_secs_f64());
        }
    }

    /// Waits until background work may move `bytes`.
    pub async fn acquire(&self, bytes: u64) {
        let wait = {
            let mut s = self.state();
            match s.rate {
                None => Duration::ZERO,
                Some(rate) => {
                    let now = Instant::now();
                    let burst = rate * BURST_SECS;
                    s.tokens = (s.tokens + now.duration_since(s.refilled).as_secs_f64() * rate).min(burst);
                    s.refilled = now;
                    s.tokens -= bytes as f64;
                    if s.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-s.tokens / rate) }
                }
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        // Counted when the work goes ahead: that is the window whose clients it can slow down.
        let mut s = self.state();
        s.used_in_window = s.used_in_window.saturating_add(bytes);
    }

    /// One controller step over the window that just ended (`elapsed` long).
    pub fn step(&self, elapsed: Duration) -> Step {
        let step = {
            let mut s = self.state();
            let used = std::mem::take(&mut s.used_in_window);
            let used_rate = used as f64 / elapsed.as_secs_f64().max(1e-3);
            let floor = s.config.min_bytes_per_sec as f64;
            // Background at or under its floor: what clients see now is what they cost alone.
            let quiet = used_rate <= floor * QUIET_MARGIN;
            let mut pressure = Pressure { slowdown: 1.0, unknown: false, clients: false };
            for window in s.methods.values_mut() {
                let samples = std::mem::take(&mut window.samples);
                if samples.is_empty() {
                    continue;
                }
                pressure.clients = true;
                if quiet {
                    window.busy.clear();
                    window.quiet.extend(samples);
                    if window.quiet.len() >= MIN_SAMPLES
                        && let Some(p) = p99(std::mem::take(&mut window.quiet))
                    {
                        window.reference = Some(window.reference.map_or(p, |r| r + IDLE_WEIGHT * (p - r)));
                    }
                    // Still learning: stay quiet.
                    pressure.unknown |= window.reference.is_none();
                    continue;
                }
                let Some(reference) = window.reference else {
                    pressure.unknown = true;
                    continue;
                };
                window.busy.extend(samples);
                if window.busy.len() >= MIN_SAMPLES
                    && let Some(p) = p99(std::mem::take(&mut window.busy))
                {
                    pressure.slowdown = pressure.slowdown.max(p / reference.max(1e-6));
                }
            }
            s.slowdown = pressure.slowdown;
            s.recent_use += USE_WEIGHT * (used_rate - s.recent_use);
            s.rate = next_rate(&s.config, s.rate, s.recent_use, pressure, floor);
            Step { rate: s.rate, slowdown: pressure.slowdown }
        };
        self.rate_gauge.set(step.rate.unwrap_or(0.0));
        self.slowdown_gauge.set(step.slowdown);
        step
    }

    /// The controller: one step per window, forever (spawn it with the node's tasks).
    pub async fn run_controller(self: Arc<Self>) {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(self.interval()).await;
            let now = Instant::now();
            self.step(now.duration_since(last));
            last = now;
        }
    }
}

/// What a window said about clients.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pressure {
    /// The worst method's p99 over its quiet reference.
    slowdown: f64,
    /// Clients called a method whose quiet latency is not known yet while background was busy.
    unknown: bool,
    /// Any client call ended in the window.
    clients: bool,
}

/// The rate after a window: the control law, kept pure for its table test.
fn next_rate(
    config: &ThrottleConfig,
    rate: Option<f64>,
    recent_use: f64,
    pressure: Pressure,
    floor: f64,
) -> Option<f64> {
    if !config.enabled || !pressure.clients {
        // No client in the window: nothing to protect, background runs free until one comes.
        return None;
    }
    if pressure.unknown {
        // Quiet the background for a window or more to learn what clients cost without it
        // (a node started busy, or a method never seen quiet).
        return Some(floor);
    }
    if pressure.slowdown > config.max_slowdown && recent_use > 0.0 {
        let base = rate.map_or(recent_use, |r| r.min(recent_use));
        return Some((base * DECREASE).max(floor));
    }
    // Growth follows use: a budget far above what background uses would let the next burst
    // (a recovery starting after the index caught up) hit clients at full speed at once.
    let cap = (recent_use * HEADROOM).max(floor);
    match rate {
        None => None,
        Some(r) if r * INCREASE > UNLIMITED_ABOVE => None,
        Some(r) => Some((r * INCREASE).min(cap).max(floor)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MIB: f64 = 1024.0 * 1024.0;

    /// name, config, rate, used, slowdown, unknown, expected; with clients unless noted.
    type LawCase<'a> = (&'a str, &'a ThrottleConfig, Option<f64>, f64, f64, bool, Option<f64>);

    #[test]
    fn the_control_law() {
        let on = ThrottleConfig::default();
        let off = ThrottleConfig { enabled: false, ..ThrottleConfig::default() };
        let floor = 4.0 * MIB;
        #[rustfmt::skip]
        let cases: &[LawCase] = &[
            ("off: unlimited whatever the latency", &off, Some(10.0 * MIB), 100.0 * MIB, 9.0, true, None),
            ("unlimited and no pressure: stays unlimited", &on, None, 100.0 * MIB, 1.0, false, None),
            ("no client in the window: unlimited at once", &on, Some(5.0 * MIB), 5.0 * MIB, 1.0, false, None),
            ("pressure cuts to 0.7 of what was used", &on, None, 100.0 * MIB, 2.0, false, Some(70.0 * MIB)),
            ("pressure cuts from the rate when it binds tighter", &on, Some(50.0 * MIB), 100.0 * MIB, 2.0, false, Some(35.0 * MIB)),
            ("never below the floor", &on, Some(5.0 * MIB), 5.0 * MIB, 3.0, false, Some(floor)),
            ("at the limit of the slowdown: no cut", &on, Some(40.0 * MIB), 40.0 * MIB, 1.2, false, Some(50.0 * MIB)),
            ("pressure with no background bytes: no cut, the budget follows use to the floor", &on, Some(40.0 * MIB), 0.0, 5.0, false, Some(floor)),
            ("growth stops binding and is dropped", &on, Some(60.0 * 1024.0 * MIB), 1.0, 1.0, false, None),
            ("growth stays within twice what background used", &on, Some(40.0 * MIB), 10.0 * MIB, 1.0, false, Some(20.0 * MIB)),
            ("clients of unknown quiet latency: down to the floor to learn it", &on, None, 100.0 * MIB, 1.0, true, Some(floor)),
        ];
        for (name, config, rate, used, slowdown, unknown, expected) in cases {
            let clients = !name.starts_with("no client");
            let pressure = Pressure { slowdown: *slowdown, unknown: *unknown, clients };
            assert_eq!(next_rate(config, *rate, *used, pressure, floor), *expected, "{name}");
        }
    }

    fn throttle() -> Arc<BackgroundThrottle> {
        BackgroundThrottle::new(ThrottleConfig::default(), &Registry::new()).unwrap()
    }

    fn window(t: &BackgroundThrottle, method: &'static str, ms: f64, n: usize) {
        for _ in 0..n {
            t.record_foreground(method, Duration::from_secs_f64(ms / 1000.0));
        }
    }

    /// Background moved `bytes` in this window (without waiting for the bucket).
    fn used(t: &BackgroundThrottle, bytes: u64) {
        t.state().used_in_window += bytes;
    }

    #[test]
    fn quiet_latency_is_learned_and_background_backs_off_when_clients_slow_down() {
        let t = throttle();
        let second = Duration::from_secs(1);
        // Background busy before any client came: the first client calls make it quiet down.
        used(&t, 100 * 1024 * 1024);
        window(&t, "read", 6.0, 3);
        assert_eq!(t.step(second).rate, Some(4.0 * MIB));
        // Quiet (at the floor): reads at 2 ms are learned once there are enough of them.
        used(&t, 3 * 1024 * 1024);
        window(&t, "read", 2.0, 5);
        assert_eq!(t.step(second).rate, Some(4.0 * MIB), "five reads are not enough to learn from");
        used(&t, 3 * 1024 * 1024);
        window(&t, "read", 2.0, 5);
        assert_eq!(t.step(second).rate, Some(4.0 * MIB * INCREASE), "learned: the budget grows");
        // Background at 100 MiB/s and reads at 6 ms: too few to judge by yet.
        used(&t, 100 * 1024 * 1024);
        window(&t, "read", 6.0, 4);
        let step = t.step(second);
        assert_eq!(step.slowdown, 1.0, "four reads are not enough to judge by");
        assert_eq!(step.rate, Some(4.0 * MIB * INCREASE * INCREASE));
        // Four more: 3x, cut to 0.7 of the rate that bound it.
        used(&t, 100 * 1024 * 1024);
        window(&t, "read", 6.0, 4);
        let step = t.step(second);
        assert!((step.slowdown - 3.0).abs() < 1e-9, "{step:?}");
        let cut = 4.0 * MIB * INCREASE * INCREASE * DECREASE;
        assert_eq!(step.rate, Some(cut));
        // Reads back at 2 ms under 20 MiB/s of background: the budget grows again.
        used(&t, 20 * 1024 * 1024);
        window(&t, "read", 2.0, 20);
        let step = t.step(second);
        assert_eq!(step.slowdown, 1.0);
        assert_eq!(step.rate, Some(cut * INCREASE));
    }

    #[test]
    fn a_node_starts_at_its_floor_until_a_window_shows_no_clients() {
        let t = throttle();
        assert_eq!(t.state().rate, Some(4.0 * MIB), "background starts at the floor");
        used(&t, 1024 * 1024);
        assert_eq!(t.step(Duration::from_secs(1)).rate, None, "no client in the first window: unlimited");
        let off =
            BackgroundThrottle::new(ThrottleConfig { enabled: false, ..ThrottleConfig::default() }, &Registry::new())
                .unwrap();
        assert_eq!(off.state().rate, None, "off: never limited");
    }

    /// A catch-up charges its certificates in lumps that leave most windows without use; clients
    /// are not slowed, so the budget must still grow past the floor (growth capped by a single
    /// window's use held it there).
    #[tokio::test(start_paused = true)]
    async fn background_that_moves_in_lumps_still_grows_past_its_floor() {
        let t = throttle();
        let lumps = {
            let t = t.clone();
            tokio::spawn(async move {
                loop {
                    t.acquire(4 * 1024 * 1024).await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let window_len = Duration::from_millis(250);
        for _ in 0..160 {
            tokio::time::sleep(window_len).await;
            window(&t, "read", 2.0, 10);
            t.step(window_len);
        }
        lumps.abort();
        let rate = t.state().rate;
        assert!(rate.is_none_or(|r| r > 3.0 * 4.0 * MIB), "after 40 s of unhurt clients the budget is {rate:?}");
    }

    #[tokio::test]
    async fn the_bucket_paces_background_bytes_at_the_rate() {
        let t = throttle();
        t.state().rate = Some(100.0 * MIB);
        let started = tokio::time::Instant::now();
        for _ in 0..10 {
            t.acquire(2 * 1024 * 1024).await;
        }
        // 20 MiB at 100 MiB/s cannot take less than 0.2 s (the bucket starts empty); the upper
        // bound only catches a wait that grows without bound.
        let took = started.elapsed().as_secs_f64();
        assert!((0.19..=5.0).contains(&took), "took {took} s");
        // Turned off live: no wait at all.
        t.set_config(ThrottleConfig { enabled: false, ..ThrottleConfig::default() });
        let started = tokio::time::Instant::now();
        t.acquire(1 << 30).await;
        assert!(started.elapsed() < Duration::from_millis(100), "a GiB waited {:?}", started.elapsed());
    }

    #[test]
    fn bad_settings_are_refused() {
        for bad in [
            ThrottleConfig { max_slowdown: 0.9, ..ThrottleConfig::default() },
            ThrottleConfig { max_slowdown: f64::NAN, ..ThrottleConfig::default() },
            ThrottleConfig { min_bytes_per_sec: 0, ..ThrottleConfig::default() },
            ThrottleConfig { interval_ms: 1, ..ThrottleConfig::default() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        ThrottleConfig::default().validate().unwrap();
    }
}
