//! Interface names: what Linux accepts as a name, narrowed to what every emitter can quote.
//!
//! Interface names reach the iptables-restore document and the nft transaction from pod
//! annotations, so a name must never be able to end its token: one function decides, and the
//! CLI, the CNI plugin and the daemon all reach it through `RawConfig::parse`.

/// Linux's IFNAMSIZ: a name is at most 15 bytes plus its NUL.
pub const IFNAMSIZ: usize = 16;

/// Why `name` cannot be an interface name of ours, or `None` when it can.
///
/// Linux's own rule (`dev_valid_name`): not empty, shorter than IFNAMSIZ bytes, not `.` or `..`,
/// no `/`, `:` or whitespace (the kernel's `isspace` also counts byte 0xA0). On top of that we
/// refuse what cannot be quoted safely in an iptables-restore line or an nft string (`"`, `\`,
/// control characters, any Unicode whitespace) and the two names iptables reads as something
/// else: a lone `+` (every interface) and a lone `!` (negation). A name of the full 15 bytes that
/// ends in a literal `*` is refused too: nft matches it only as `\*`, and its parser counts the
/// backslash against the 16-byte limit, so no nft rule can name that interface exactly.
pub fn interface_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("an interface name cannot be empty".into());
    }
    if name.len() >= IFNAMSIZ {
        return Some(format!(
            "{} bytes long; Linux interface names are at most {} bytes (IFNAMSIZ {IFNAMSIZ} with the NUL)",
            name.len(),
            IFNAMSIZ - 1
        ));
    }
    if name == "." || name == ".." {
        return Some(format!("Linux refuses {name:?} as an interface name"));
    }
    if name == "+" {
        return Some("a lone '+' is iptables' wildcard for every interface".into());
    }
    if name == "!" {
        return Some("a lone '!' is read as a negation by iptables".into());
    }
    for c in name.chars() {
        let why = match c {
            '/' | ':' => "Linux refuses it in an interface name",
            '"' | '\\' => "it cannot be quoted safely in iptables-restore and nft input",
            c if c.is_whitespace() => "whitespace is not allowed in an interface name",
            c if c.is_control() => "control characters are not allowed in an interface name",
            _ => continue,
        };
        return Some(format!("contains {c:?}: {why}"));
    }
    if name.bytes().any(|b| b == 0xA0) {
        return Some("contains byte 0xA0, which Linux counts as whitespace".into());
    }
    if name.len() == IFNAMSIZ - 1 && name.ends_with('*') {
        return Some(format!(
            "{} bytes ending in a literal '*': nft can only match it escaped (\\*), which is one byte over its limit",
            name.len()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_names_and_odd_but_valid_names_pass() {
        for ok in [
            "eth0",
            "a;b#c{d}$e@f",
            "eth+",
            "x*",
            "-j",
            "!x",
            "...",
            "é",
            "123456789012345",
            "12345678901234+",
            "1234567890123*",
        ] {
            assert_eq!(interface_name_problem(ok), None, "{ok:?}");
        }
    }

    #[test]
    fn bad_names_are_refused_with_the_rule() {
        for (bad, rule) in [
            ("", "empty"),
            ("1234567890123456", "at most 15 bytes"),
            ("ééééééééé", "at most 15 bytes"),
            (".", "refuses"),
            ("..", "refuses"),
            ("a/b", "'/'"),
            ("a:b", "':'"),
            ("a b", "whitespace"),
            ("a\tb", "whitespace"),
            ("a\u{a0}b", "whitespace"),
            ("à", "0xA0"),
            ("x;include\"sh*\"#", "quoted"),
            ("a\\b", "quoted"),
            ("a\u{1}b", "control"),
            ("a\u{7f}", "control"),
            ("+", "wildcard"),
            ("!", "negation"),
            ("0a#a000#aaa0a0*", "literal '*'"),
        ] {
            let why = interface_name_problem(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(why.contains(rule), "{bad:?}: {why}");
        }
    }
}
