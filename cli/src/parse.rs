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
    let mut total_ns: f64 = 0.0;
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
            other => return Err(format!("unknown unit '{other}' in '{s}': use ns, us, ms, s, m, h or d")),
        };
        // Far beyond any limit of chaosd (a fault lasts at most 7 days) but
        // still exact on the wire; more would wrap around in the conversion.
        total_ns += value * scale;
        if !total_ns.is_finite() || total_ns > MAX_WIRE_NS {
            return Err(format!("'{s}' is too long: chaosd accepts at most 7d for --duration and 60s for a delay"));
        }
        rest = tail;
    }
    let total_ns = total_ns as i128;
    let total_ns = if neg { -total_ns } else { total_ns };
    Ok(prost_types::Duration { seconds: (total_ns / 1_000_000_000) as i64, nanos: (total_ns % 1_000_000_000) as i32 })
}

/// The longest duration passed on to the daemon, in nanoseconds (about
/// 317 years).
const MAX_WIRE_NS: f64 = 1e19;

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
    let bytes = value * scale;
    // u64 bytes is 16 EiB: a cast would quietly make any larger size that.
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!(
            "'{s}' is more memory than any machine has: give a size such as 512MiB or 4GiB, or a share of the \
             target's memory limit such as 90%"
        ));
    }
    Ok(pb::memory_stress::Size::Bytes(bytes as u64))
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
        // Too long to carry is said so, not wrapped around into a negative.
        let e = duration("99999999999999999999h").unwrap_err();
        assert!(e.contains("too long") && e.contains("7d"), "{e}");
        assert!(duration("1e400h").is_err());
        assert_eq!(duration("-1ns").unwrap(), prost_types::Duration { seconds: 0, nanos: -1 });
        assert_eq!(duration("3650d").unwrap().seconds, 3650 * 86_400);
    }

    #[test]
    fn sizes_beyond_sixteen_exbibytes_are_refused() {
        assert!(memory_size("99999999999999999999").unwrap_err().contains("more memory than any machine"));
        assert!(memory_size("99999999999GiB").is_err());
        assert_eq!(memory_size("1024GiB").unwrap(), pb::memory_stress::Size::Bytes(1 << 40));
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
