//! Topic names and filters (MQTT 4.7).

/// A topic name a client may publish to: non-empty, no wildcards.
pub fn valid_name(t: &str) -> bool {
    !t.is_empty() && t.len() <= 65_535 && !t.contains(['+', '#'])
}

/// A topic filter: `+` fills a whole level, `#` is the whole last level.
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() {
        return false;
    }
    let mut levels = f.split('/').peekable();
    while let Some(l) = levels.next() {
        if l.contains('#') && (l != "#" || levels.peek().is_some()) {
            return false;
        }
        if l.contains('+') && l != "+" {
            return false;
        }
    }
    true
}

/// `$share/{group}/{filter}` split into group and filter.
pub fn parse_shared(f: &str) -> Option<Result<(&str, &str), ()>> {
    let rest = f.strip_prefix("$share/")?;
    let Some((group, filter)) = rest.split_once('/') else {
        return Some(Err(()));
    };
    if group.is_empty() || group.contains(['+', '#']) || !valid_filter(filter) {
        return Some(Err(()));
    }
    Some(Ok((group, filter)))
}

/// Whether `filter` matches `topic`; wildcards at the first level do not
/// match topics starting with `$` (4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_names() {
        assert!(valid_filter("a/+/c") && valid_filter("#") && valid_filter("+") && valid_filter("a//b"));
        assert!(!valid_filter("a/#/c") && !valid_filter("a+") && !valid_filter("a/b#") && !valid_filter(""));
        assert!(valid_name("a/b") && !valid_name("a/+") && !valid_name("#") && !valid_name(""));
        assert_eq!(parse_shared("$share/g/a/+"), Some(Ok(("g", "a/+"))));
        assert_eq!(parse_shared("$share/g"), Some(Err(())));
        assert_eq!(parse_shared("a/b"), None);
    }

    #[test]
    fn matching() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/+", "a/"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(matches("+/+", "/x"));
    }
}
