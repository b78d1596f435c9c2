//! Output helpers shared by the verbs: aligned tables, JSON, durations.

use std::{
    io::{self, Write},
    time::Duration,
};

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Writes one line to stdout now. Errors are returned, never a panic: a
/// reader that closed the pipe (`chaosctl list | head -1`) and a full disk
/// are the caller's to report (see `CliError: From<io::Error>`).
pub fn line(text: impl std::fmt::Display) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

pub fn print_json(v: &Value) -> io::Result<()> {
    line(serde_json::to_string_pretty(v).expect("JSON values serialize"))
}

/// Prints rows as columns separated by two spaces; the last column is not padded.
pub fn print_rows(rows: &[Vec<String>]) -> io::Result<()> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        self::line(line.trim_end())?;
    }
    Ok(())
}

/// "1h2m", "5m", "30s", "1.5s", "250ms".
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    if s < 60 {
        let tenths = (ms % 1000) / 100;
        return if tenths == 0 { format!("{s}s") } else { format!("{s}.{tenths}s") };
    }
    let (h, m, s) = (s / 3600, (s % 3600) / 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 && h == 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// A protobuf duration as JSON seconds with fractions, as protobuf's JSON mapping does ("1.500s").
pub fn duration_json(d: &Option<prost_types::Duration>) -> Value {
    match d.as_ref().and_then(chaos_proto::duration_from_proto) {
        Some(d) => Value::String(format!("{:.3}s", d.as_secs_f64())),
        None => Value::Null,
    }
}

/// "512MiB", "1.5GiB", "812KiB".
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b}B") } else { format!("{v:.1}{}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_person_writes_them() {
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human_duration(Duration::from_secs(300)), "5m");
        assert_eq!(human_duration(Duration::from_secs(3720)), "1h2m");
    }

    #[test]
    fn sizes_up_to_exbibytes() {
        assert_eq!(human_bytes(1536 << 20), "1.5GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0EiB");
    }
}
