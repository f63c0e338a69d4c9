//! The link model: what happens to a packet between the two namespaces.
//!
//! Time is passed in by the caller (nanoseconds since an arbitrary start),
//! so the model runs the same on synthetic packets in a unit test as on
//! live traffic.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// What one direction of the link does to the packets that cross it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkConfig {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Each packet's delay varies uniformly within ± this much. Jitter alone
    /// does not reorder: a packet never overtakes the one sent before it.
    pub jitter: Duration,
    /// Probability that a packet is lost on the wire (0..=1).
    pub loss: f64,
    /// Probability that a packet is held back by `reorder_gap`, letting the
    /// packets after it overtake it.
    pub reorder: f64,
    /// How long a reordered packet is held back.
    pub reorder_gap: Duration,
    /// Probability that a packet arrives twice.
    pub duplicate: f64,
    /// Probability that one bit of a packet's payload (past the IP header,
    /// so the transport's checksum is what must catch it) is flipped.
    pub corrupt: f64,
    /// Bottleneck rate in bits per second; `None` is unlimited.
    pub rate_bps: Option<u64>,
    /// Drop-tail queue in front of the bottleneck, in bytes; `None` sizes it
    /// to one bandwidth-delay product of the round trip (at least 64 KiB).
    pub queue_bytes: Option<u64>,
}

impl LinkConfig {
    /// The queue limit in force: the configured one or one round trip's worth.
    pub fn queue_limit(&self) -> u64 {
        if let Some(q) = self.queue_bytes {
            return q;
        }
        let rate = self.rate_bps.unwrap_or(0) as u128;
        let rtt_ns = 2 * self.delay.as_nanos();
        let bdp = (rate * rtt_ns / 8 / 1_000_000_000) as u64;
        bdp.max(64 * 1024)
    }
}

/// Counters of what the link did, per direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets handed to the link.
    pub offered: u64,
    /// Bytes handed to the link.
    pub offered_bytes: u64,
    /// Packets handed on at the far end (duplicates included).
    pub delivered: u64,
    /// Packets lost at random.
    pub lost: u64,
    /// Packets dropped because the bottleneck queue was full.
    pub queue_drops: u64,
    /// Packets held back to be overtaken.
    pub reordered: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Packets with a bit flipped.
    pub corrupted: u64,
}

/// A small, seedable generator (SplitMix64): the link's randomness must be
/// repeatable in tests, and needs nothing stronger.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// Uniform in [0, n); `n` must not be zero.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Pending {
    due: u64,
    seq: u64,
    packet: Vec<u8>,
}

/// One direction of the emulated link.
pub struct Link {
    cfg: LinkConfig,
    queue_limit: u64,
    rng: Rng,
    in_flight: BinaryHeap<Reverse<Pending>>,
    seq: u64,
    /// When the bottleneck will have finished sending what it already holds.
    busy_until: u64,
    /// Delivery time of the last in-order packet: jitter never reorders.
    last_due: u64,
    stats: Stats,
}

impl Link {
    /// A link that behaves as `cfg` says, its randomness drawn from `seed`.
    pub fn new(cfg: LinkConfig, seed: u64) -> Self {
        Link {
            queue_limit: cfg.queue_limit(),
            cfg,
            rng: Rng::new(seed),
            in_flight: BinaryHeap::new(),
            seq: 0,
            busy_until: 0,
            last_due: 0,
            stats: Stats::default(),
        }
    }

    /// What the link has done so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Packets on the link now (queued or in flight).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// True when no packet is on the link.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// A packet enters the link at time `now` (ns).
    pub fn offer(&mut self, now: u64, mut packet: Vec<u8>) {
        self.stats.offered += 1;
        self.stats.offered_bytes += packet.len() as u64;
        let mut depart = now;
        if let Some(rate) = self.cfg.rate_bps.filter(|r| *r > 0) {
            let backlog_ns = self.busy_until.saturating_sub(now);
            let backlog = (backlog_ns as u128 * rate as u128 / 8_000_000_000) as u64;
            if backlog + packet.len() as u64 > self.queue_limit {
                self.stats.queue_drops += 1;
                return;
            }
            let tx_ns = (packet.len() as u128 * 8_000_000_000 / rate as u128) as u64;
            depart = self.busy_until.max(now) + tx_ns;
            self.busy_until = depart;
        }
        // Lost on the wire, after it used its share of the bottleneck.
        if self.rng.chance(self.cfg.loss) {
            self.stats.lost += 1;
            return;
        }
        if self.rng.chance(self.cfg.corrupt) && flip_payload_bit(&mut packet, &mut self.rng) {
            self.stats.corrupted += 1;
        }
        let mut delay = self.cfg.delay.as_nanos() as u64;
        let jitter = self.cfg.jitter.as_nanos() as u64;
        if jitter > 0 {
            let offset = self.rng.below(2 * jitter + 1);
            delay = (delay + offset).saturating_sub(jitter);
        }
        let mut due = (depart + delay).max(self.last_due);
        if self.rng.chance(self.cfg.reorder) {
            self.stats.reordered += 1;
            due += self.cfg.reorder_gap.as_nanos() as u64;
        } else {
            self.last_due = due;
        }
        if self.rng.chance(self.cfg.duplicate) {
            self.stats.duplicated += 1;
            self.push(due, packet.clone());
        }
        self.push(due, packet);
    }

    fn push(&mut self, due: u64, packet: Vec<u8>) {
        self.seq += 1;
        self.in_flight.push(Reverse(Pending {
            due,
            seq: self.seq,
            packet,
        }));
    }

    /// When the next packet is due at the far end, if any is on the link.
    pub fn next_due(&self) -> Option<u64> {
        self.in_flight.peek().map(|p| p.0.due)
    }

    /// The next packet due at or before `now`, in delivery order.
    pub fn pop_due(&mut self, now: u64) -> Option<Vec<u8>> {
        if self.next_due()? > now {
            return None;
        }
        let p = self.in_flight.pop()?.0;
        self.stats.delivered += 1;
        Some(p.packet)
    }
}

/// Flips one random bit after the IP header (v4 or v6). Returns false when
/// the packet has no payload to damage.
fn flip_payload_bit(packet: &mut [u8], rng: &mut Rng) -> bool {
    let header = match packet.first().map(|b| b >> 4) {
        Some(4) => usize::from(packet[0] & 0x0f) * 4,
        Some(6) => 40,
        _ => 0,
    };
    if packet.len() <= header {
        return false;
    }
    let i = header + rng.below((packet.len() - header) as u64) as usize;
    packet[i] ^= 1 << rng.below(8);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn ipv4(len: usize, id: u32) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[20..24].copy_from_slice(&id.to_be_bytes());
        p
    }

    fn id(p: &[u8]) -> u32 {
        u32::from_be_bytes([p[20], p[21], p[22], p[23]])
    }

    /// Runs the link at a 10 µs tick until it is empty; returns
    /// (delivery time, packet) in delivery order.
    fn drain(link: &mut Link, from: u64) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut now = from;
        while !link.is_empty() {
            now = now.max(link.next_due().unwrap_or(now));
            while let Some(p) = link.pop_due(now) {
                out.push((now, p));
            }
        }
        out
    }

    #[test]
    fn delay_is_exact_without_jitter_and_order_is_kept() {
        let cfg = LinkConfig {
            delay: Duration::from_millis(25),
            ..Default::default()
        };
        let mut link = Link::new(cfg, 1);
        for i in 0..100u32 {
            link.offer(u64::from(i) * MS, ipv4(100, i));
        }
        let out = drain(&mut link, 0);
        assert_eq!(out.len(), 100);
        for (i, (t, p)) in out.iter().enumerate() {
            assert_eq!(id(p), i as u32);
            assert_eq!(*t, i as u64 * MS + 25 * MS);
        }
    }

    #[test]
    fn jitter_stays_within_bounds_and_never_reorders() {
        let cfg = LinkConfig {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(5),
            ..Default::default()
        };
        let mut link = Link::new(cfg, 7);
        let mut sent = Vec::new();
        for i in 0..10_000u32 {
            let t = u64::from(i) * 2 * MS; // 2 ms apart: ±5 ms of jitter would reorder
            sent.push(t);
            link.offer(t, ipv4(64, i));
        }
        let mut spread = (u64::MAX, 0);
        for (i, (t, p)) in drain(&mut link, 0).into_iter().enumerate() {
            assert_eq!(id(&p), i as u32, "jitter reordered packets");
            let d = t - sent[i];
            assert!((15 * MS..=25 * MS).contains(&d), "delay {d} out of bounds");
            spread = (spread.0.min(d), spread.1.max(d));
        }
        // The jitter is really there: delays spread over most of ±5 ms.
        assert!(spread.0 < 16 * MS && spread.1 > 24 * MS, "{spread:?}");
    }

    #[test]
    fn loss_rate_matches_the_configured_probability() {
        let cfg = LinkConfig {
            loss: 0.01,
            ..Default::default()
        };
        let mut link = Link::new(cfg, 42);
        let n = 200_000u32;
        for i in 0..n {
            link.offer(u64::from(i), ipv4(60, i));
        }
        let lost = link.stats().lost;
        // Binomial: mean 2000, sd ≈ 44.5; 4 sd either side.
        assert!((1822..=2178).contains(&lost), "lost {lost} of {n}");
        assert_eq!(drain(&mut link, 0).len() as u64, u64::from(n) - lost);
    }

    #[test]
    fn rate_limit_spaces_packets_at_the_configured_rate() {
        let cfg = LinkConfig {
            rate_bps: Some(100_000_000),
            queue_bytes: Some(u64::MAX),
            delay: Duration::from_millis(10),
            ..Default::default()
        };
        let mut link = Link::new(cfg, 1);
        for i in 0..10_000u32 {
            link.offer(0, ipv4(1500, i));
        }
        let out = drain(&mut link, 0);
        assert_eq!(out.len(), 10_000);
        // 10,000 × 1500 B × 8 at 100 Mbit/s = 1.2 s, plus the 10 ms delay.
        let last = out.last().map(|(t, _)| *t).unwrap_or(0);
        assert_eq!(last, 1_200_000_000 + 10 * MS);
        // And evenly: each packet 120 µs after the one before.
        for w in out.windows(2) {
            assert_eq!(w[1].0 - w[0].0, 120_000);
        }
    }

    #[test]
    fn a_full_queue_drops_the_tail() {
        let cfg = LinkConfig {
            rate_bps: Some(8_000_000), // 1 byte per µs
            queue_bytes: Some(15_000),
            ..Default::default()
        };
        let mut link = Link::new(cfg, 1);
        for i in 0..100u32 {
            link.offer(0, ipv4(1000, i));
        }
        // A burst of 100 kB into a 15 kB queue: 15 packets fit.
        assert_eq!(link.stats().queue_drops, 85);
        assert_eq!(link.len(), 15);
        // Once the queue has drained, packets get through again.
        link.offer(1_000_000_000, ipv4(1000, 1000));
        assert_eq!(link.stats().queue_drops, 85);
    }

    #[test]
    fn default_queue_is_one_round_trip_of_data() {
        let cfg = LinkConfig {
            rate_bps: Some(1_000_000_000),
            delay: Duration::from_millis(25),
            ..Default::default()
        };
        assert_eq!(cfg.queue_limit(), 6_250_000);
        assert_eq!(LinkConfig::default().queue_limit(), 64 * 1024);
    }

    #[test]
    fn reordered_packets_are_overtaken() {
        let cfg = LinkConfig {
            delay: Duration::from_millis(5),
            reorder: 0.05,
            reorder_gap: Duration::from_millis(1),
            ..Default::default()
        };
        let mut link = Link::new(cfg, 3);
        for i in 0..20_000u32 {
            link.offer(u64::from(i) * 10_000, ipv4(64, i)); // every 10 µs
        }
        let reordered = link.stats().reordered;
        assert!((800..=1200).contains(&reordered), "{reordered}");
        let out = drain(&mut link, 0);
        assert_eq!(out.len(), 20_000);
        let late = out.windows(2).filter(|w| id(&w[1].1) < id(&w[0].1)).count() as u64;
        // Each held-back packet lands after later ones (rarely two held
        // back land together).
        assert!(late <= reordered && late * 10 >= reordered * 9, "{late} of {reordered}");
    }

    #[test]
    fn duplicates_arrive_twice() {
        let cfg = LinkConfig {
            duplicate: 0.02,
            ..Default::default()
        };
        let mut link = Link::new(cfg, 9);
        for i in 0..50_000u32 {
            link.offer(u64::from(i), ipv4(64, i));
        }
        let dup = link.stats().duplicated;
        assert!((850..=1150).contains(&dup), "{dup}");
        let out = drain(&mut link, 0);
        assert_eq!(out.len() as u64, 50_000 + dup);
        let twice = out.windows(2).filter(|w| w[0].1 == w[1].1).count() as u64;
        assert_eq!(twice, dup);
    }

    #[test]
    fn corruption_flips_one_payload_bit_and_spares_the_ip_header() {
        let cfg = LinkConfig {
            corrupt: 0.1,
            ..Default::default()
        };
        let mut link = Link::new(cfg, 11);
        let n = 10_000u32;
        for i in 0..n {
            link.offer(u64::from(i), ipv4(200, i));
        }
        let corrupted = link.stats().corrupted;
        assert!((880..=1120).contains(&corrupted), "{corrupted}");
        let mut seen = 0;
        for (i, (_, p)) in drain(&mut link, 0).into_iter().enumerate() {
            let clean = ipv4(200, i as u32);
            let bits: u32 = p.iter().zip(&clean).map(|(a, b)| (a ^ b).count_ones()).sum();
            if bits > 0 {
                seen += 1;
                assert_eq!(bits, 1);
                assert_eq!(p[..20], clean[..20], "IP header touched");
            }
        }
        assert_eq!(seen, corrupted);
    }

    #[test]
    fn the_same_seed_gives_the_same_link() {
        let cfg = LinkConfig {
            loss: 0.1,
            jitter: Duration::from_millis(1),
            delay: Duration::from_millis(2),
            ..Default::default()
        };
        let run = |seed| {
            let mut link = Link::new(cfg.clone(), seed);
            for i in 0..1000u32 {
                link.offer(u64::from(i) * 1000, ipv4(64, i));
            }
            drain(&mut link, 0)
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }
}
