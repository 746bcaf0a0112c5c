//! Sizes (`40GiB`, `512MiB`, `1.5GB`) and durations (`30s`, `1h30m`, `250ms`).

use crate::{Error, Result};
use std::time::Duration;

/// Parses a byte size. Binary units (`KiB`, `MiB`, `GiB`, `TiB`) and decimal units
/// (`KB`, `MB`, `GB`, `TB`) are accepted; a bare number is bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        Error::Parse(format!(
            "invalid size {text:?}: expected e.g. 512MiB or 40GiB"
        ))
    })?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KiB" | "Ki" => 1024.0,
        "M" | "MiB" | "Mi" => 1024.0 * 1024.0,
        "G" | "GiB" | "Gi" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TiB" | "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        other => {
            return Err(Error::Parse(format!(
                "invalid size {text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            )));
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(Error::Parse(format!("invalid size {text:?}: out of range")));
    }
    Ok(bytes.round() as u64)
}

/// Formats a byte count with a binary unit (`1.5 GiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Parses a duration such as `30s`, `5m`, `1h30m`, `250ms`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(t).map_err(|e| {
        Error::Parse(format!(
            "invalid duration {text:?}: {e} (use e.g. 30s, 5m, 1h30m)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("40GiB").ok(), Some(40 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("512MiB").ok(), Some(512 * 1024 * 1024));
        assert_eq!(parse_size("1.5GB").ok(), Some(1_500_000_000));
        assert_eq!(parse_size("100").ok(), Some(100));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("GiB").is_err());
        assert_eq!(format_size(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").ok(), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_duration("1h30m").ok(),
            Some(Duration::from_secs(5400))
        );
        assert_eq!(
            parse_duration("250ms").ok(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_duration("7").ok(), Some(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
    }
}
