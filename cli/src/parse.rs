//! Parsing of the values people type: durations, rates, sizes, port ranges.
//! Only syntax is checked here; ranges (port 0, percent > 100, ...) are
//! checked by the daemon, the single place that decides what is valid.

use chaos_proto::chaosd::v1 as pb;

/// "500ms", "30s", "5m", "1h", "1m30s", "1.5s"; a leading '-' gives a
/// negative duration (which the daemon refuses with a clear message).
pub fn duration(s: &str) -> Result<prost_types::Duration, String> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    if body.is_empty() {
        return Err("empty duration: write e.g. 500ms, 30s, 5m or 1h".into());
    }
    let mut total_ns: i128 = 0;
    let mut rest = body;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let value: f64 =
            num.parse().map_err(|_| format!("'{s}' is not a duration: write e.g. 500ms, 30s, 5m or 1h"))?;
        let scale: f64 = match unit {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "d" => 86400e9,
            "" if value == 0.0 => 0.0,
            "" => return Err(format!("'{s}' has no unit: write e.g. {num}ms or {num}s")),
            other => return Err(format!("unknown unit '{other}' in '{s}': use ms, s, m, h or d")),
        };
        total_ns += (value * scale) as i128;
        rest = tail;
    }
    let total_ns = if neg { -total_ns } else { total_ns };
    Ok(prost_types::Duration { seconds: (total_ns / 1_000_000_000) as i64, nanos: (total_ns % 1_000_000_000) as i32 })
}

/// tc-style rates: "1mbit", "100kbit", "1gbit", "8000bit", "125kbps" (bytes).
pub fn rate(s: &str) -> Result<u64, String> {
    let lower = s.to_ascii_lowercase();
    let split = lower.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(lower.len());
    let (num, unit) = lower.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("'{s}' is not a rate: write e.g. 1mbit, 512kbit or 1gbit"))?;
    let scale = match unit {
        "bit" | "" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "bps" => 8.0,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        _ => {
            return Err(format!(
                "unknown rate unit in '{s}': use bit, kbit, mbit, gbit (or bps, kbps, mbps for bytes)"
            ));
        }
    };
    Ok((value * scale) as u64)
}

/// "512MiB", "1GiB", "100M", "4096", or a percentage "90%".
pub fn memory_size(s: &str) -> Result<pb::memory_stress::Size, String> {
    if let Some(p) = s.strip_suffix('%') {
        return p
            .parse::<f64>()
            .map(pb::memory_stress::Size::PercentOfLimit)
            .map_err(|_| format!("'{s}' is not a percentage"));
    }
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("'{s}' is not a size: write e.g. 512MiB, 1GiB or 90%"))?;
    let scale: f64 = match unit {
        "" | "B" => 1.0,
        "K" | "KiB" | "k" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        other => return Err(format!("unknown size unit '{other}' in '{s}': use KiB, MiB, GiB (or KB, MB, GB)")),
    };
    Ok(pb::memory_stress::Size::Bytes((value * scale) as u64))
}

/// "7000" or "7000-7010".
pub fn port_range(s: &str) -> Result<pb::PortRange, String> {
    let num =
        |p: &str| p.trim().parse::<u32>().map_err(|_| format!("'{s}' is not a port or a range such as 7000-7010"));
    match s.split_once('-') {
        Some((a, b)) => Ok(pb::PortRange { first: num(a)?, last: num(b)? }),
        None => {
            let p = num(s)?;
            Ok(pb::PortRange { first: p, last: p })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("500ms").unwrap(), prost_types::Duration { seconds: 0, nanos: 500_000_000 });
        assert_eq!(duration("5m").unwrap().seconds, 300);
        assert_eq!(duration("1h").unwrap().seconds, 3600);
        assert_eq!(duration("1m30s").unwrap().seconds, 90);
        assert_eq!(duration("0").unwrap().seconds, 0);
        assert!(duration("-10ms").unwrap().nanos < 0);
        assert!(duration("10").unwrap_err().contains("no unit"));
        assert!(duration("10x").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn rates_sizes_ports() {
        assert_eq!(rate("1mbit").unwrap(), 1_000_000);
        assert_eq!(rate("125kbps").unwrap(), 1_000_000);
        assert!(rate("1 furlong").is_err());
        assert_eq!(memory_size("512MiB").unwrap(), pb::memory_stress::Size::Bytes(512 << 20));
        assert_eq!(memory_size("90%").unwrap(), pb::memory_stress::Size::PercentOfLimit(90.0));
        assert_eq!(port_range("7000-7010").unwrap(), pb::PortRange { first: 7000, last: 7010 });
        assert_eq!(port_range("1883").unwrap(), pb::PortRange { first: 1883, last: 1883 });
        assert!(port_range("http").is_err());
    }
}
