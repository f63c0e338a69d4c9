//! Command-line values: durations, probabilities, rates, sizes, and the
//! `A/B` form that gives each direction its own value.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::link::LinkConfig;

/// A duration such as `25ms`, `0.5ms`, `250us`, `1s`.
pub fn duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        bail!("duration {s:?} needs a unit: us, ms or s (e.g. 25ms)")
    };
    let v: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("duration {s:?}: {num:?} is not a number"))?;
    if !(v.is_finite() && v >= 0.0 && v * scale <= 3600.0) {
        bail!("duration {s:?} must be between 0 and 1 hour");
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// A probability written as a percentage, `1%` or `0.1%`.
pub fn percent(s: &str) -> Result<f64> {
    let s = s.trim();
    let Some(num) = s.strip_suffix('%') else {
        bail!("probability {s:?} must be a percentage such as 1% or 0.1%")
    };
    let v: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("probability {s:?}: {num:?} is not a number"))?;
    if !(0.0..=100.0).contains(&v) {
        bail!("probability {s:?} must be between 0% and 100%");
    }
    Ok(v / 100.0)
}

/// A rate in bits per second, as tc writes it: `1gbit`, `200mbit`,
/// `500kbit`, `64000bit`.
pub fn rate(s: &str) -> Result<u64> {
    let lower = s.trim().to_ascii_lowercase();
    let (num, scale) = if let Some(n) = lower.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = lower.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = lower.strip_suffix("kbit") {
        (n, 1e3)
    } else if let Some(n) = lower.strip_suffix("bit") {
        (n, 1.0)
    } else {
        bail!("rate {s:?} needs a unit: gbit, mbit, kbit or bit (e.g. 200mbit)")
    };
    let v: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("rate {s:?}: {num:?} is not a number"))?;
    let bps = v * scale;
    if !(bps.is_finite() && (1000.0..=1e12).contains(&bps)) {
        bail!("rate {s:?} must be between 1kbit and 1000gbit");
    }
    Ok(bps as u64)
}

/// A size in bytes: `64k`, `6m`, `1000`.
pub fn size(s: &str) -> Result<u64> {
    let lower = s.trim().to_ascii_lowercase();
    let (num, scale) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1u64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        _ => (lower.as_str(), 1),
    };
    let v: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("size {s:?}: {num:?} is not a whole number"))?;
    v.checked_mul(scale)
        .filter(|b| *b >= 1500)
        .with_context(|| format!("size {s:?} must be at least 1500 bytes (one packet)"))
}

/// `X` for both directions or `X/Y` for a→b and b→a.
pub fn pair<T: Clone>(s: &str, parse: impl Fn(&str) -> Result<T>) -> Result<(T, T)> {
    match s.split_once('/') {
        Some((a, b)) => Ok((parse(a)?, parse(b)?)),
        None => {
            let v = parse(s)?;
            Ok((v.clone(), v))
        }
    }
}

/// The link profiles the WAN benchmark uses. RTTs are split evenly between
/// the two directions; loss applies to each direction.
pub fn profile(name: &str) -> Result<LinkConfig> {
    let ms = Duration::from_micros;
    let base = LinkConfig {
        rate_bps: Some(1_000_000_000),
        ..Default::default()
    };
    Ok(match name {
        "lan" => LinkConfig { delay: ms(250), ..base },
        "continent" => LinkConfig {
            delay: ms(25_000),
            loss: 0.001,
            ..base
        },
        "lossy" => LinkConfig {
            delay: ms(25_000),
            loss: 0.01,
            ..base
        },
        "far" => LinkConfig {
            rate_bps: Some(200_000_000),
            delay: ms(75_000),
            loss: 0.005,
            reorder: 0.001,
            reorder_gap: ms(1_000),
            ..base
        },
        other => bail!("unknown profile {other:?}: one of lan, continent, lossy, far"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_with_units_and_refuse_without() {
        assert_eq!(duration("25ms").ok(), Some(Duration::from_millis(25)));
        assert_eq!(duration("0.5ms").ok(), Some(Duration::from_micros(500)));
        assert_eq!(duration("250us").ok(), Some(Duration::from_micros(250)));
        assert_eq!(duration("2s").ok(), Some(Duration::from_secs(2)));
        assert!(duration("25").is_err());
        assert!(duration("-1ms").is_err());
        assert!((percent("0.1%").unwrap_or(0.0) - 0.001).abs() < 1e-12);
        assert!(percent("1").is_err());
        assert!(percent("101%").is_err());
        assert_eq!(rate("1gbit").ok(), Some(1_000_000_000));
        assert_eq!(rate("200Mbit").ok(), Some(200_000_000));
        assert!(rate("1gb").is_err());
        assert_eq!(size("64k").ok(), Some(65_536));
        assert!(size("100").is_err());
    }

    #[test]
    fn a_slash_gives_each_direction_its_value() {
        let (a, b) = pair("10ms/30ms", duration).unwrap_or_default();
        assert_eq!((a, b), (Duration::from_millis(10), Duration::from_millis(30)));
        let (a, b) = pair("1%", percent).unwrap_or_default();
        assert_eq!(a, b);
        let err = pair("10ms/x", duration).err().map(|e| format!("{e:#}"));
        assert!(err.is_some_and(|e| e.contains("\"x\"")));
    }

    #[test]
    fn profiles_match_the_benchmark_links() {
        let far = profile("far").unwrap_or_default();
        assert_eq!(far.rate_bps, Some(200_000_000));
        assert_eq!(far.delay * 2, Duration::from_millis(150));
        assert!(profile("moon").is_err());
    }
}
