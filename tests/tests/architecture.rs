//! The house rules that keep `interceptor/src` one-way: no module imports its way back to
//! itself (checked over every `use` and `crate::`/`super::`/`self::` path, test modules aside,
//! as `cargo modules dependencies --acyclic` would), and no room over 700 lines.
//!
//! A module is one file (`a/b.rs` or `a/b/mod.rs` is `a::b`); a path names the longest module
//! prefix it has. Re-exports count as edges (a `mod.rs` that re-exports a child depends on it);
//! `mod x;` declarations do not.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 700;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `backend/ebpf/mod.rs` → `backend::ebpf`; `lib.rs` and `main.rs` → the crate root, `""`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

/// The source with comments, string and char literals blanked (newlines kept).
fn code_only(text: &str) -> String {
    let b: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !b[..i]
                .last()
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // Raw string r"…" / r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                blank(&mut out, b[j]);
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                if i < b.len() {
                    blank(&mut out, b[i]);
                }
                i += 1;
            }
            out.push_str("\"\"");
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): blank only the former.
            let close = if next == Some('\\') {
                (i + 2..b.len().min(i + 12)).find(|&j| b[j] == '\'')
            } else {
                (b.get(i + 2) == Some(&'\'')).then_some(i + 2)
            };
            match close {
                Some(j) => {
                    out.push_str("' '");
                    i = j + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Removes `#[cfg(test)] mod NAME { … }` blocks: test code is not part of the layering.
fn without_test_modules(code: &str) -> String {
    let mut out = code.to_string();
    while let Some(at) = out.find("#[cfg(test)]") {
        let rest = &out[at + "#[cfg(test)]".len()..];
        let trimmed = rest.trim_start();
        let skip = rest.len() - trimmed.len();
        let is_mod = trimmed.starts_with("mod ") || trimmed.starts_with("pub mod ");
        let open = trimmed.find(['{', ';']);
        let end = match (is_mod, open) {
            (true, Some(o)) if trimmed.as_bytes()[o] == b'{' => {
                let mut depth = 0;
                let mut end = None;
                for (k, ch) in trimmed[o..].char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = Some(o + k + 1);
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end.expect("unbalanced braces after #[cfg(test)]")
            }
            // `#[cfg(test)] mod x;` (a test file) or a test-only item: drop up to `;`/`{…}`.
            (_, Some(o)) if trimmed.as_bytes()[o] == b';' => o + 1,
            _ => 0,
        };
        let cut = at + "#[cfg(test)]".len() + skip + end;
        out.replace_range(at..cut, "");
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, self}}`) into full paths.
fn expand_use(tree: &str) -> Vec<String> {
    fn go(prefix: &str, s: &str, out: &mut Vec<String>) {
        let s = s.trim();
        if let Some(open) = s.find('{') {
            let head = s[..open].trim().trim_end_matches("::");
            let inner = &s[open + 1..s.rfind('}').unwrap_or(s.len())];
            let base = join(prefix, head);
            let mut depth = 0;
            let mut start = 0;
            for (k, ch) in inner.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        go(&base, &inner[start..k], out);
                        start = k + 1;
                    }
                    _ => {}
                }
            }
            go(&base, &inner[start..], out);
        } else if !s.is_empty() {
            let s = s.split(" as ").next().unwrap_or(s).trim();
            let s = s.strip_suffix("::self").unwrap_or(s);
            if s == "self" {
                out.push(prefix.to_string());
            } else if s != "*" {
                out.push(join(prefix, s.trim_end_matches("::*")));
            } else {
                out.push(prefix.to_string());
            }
        }
    }
    fn join(a: &str, b: &str) -> String {
        match (a.is_empty(), b.is_empty()) {
            (true, _) => b.to_string(),
            (_, true) => a.to_string(),
            _ => format!("{a}::{b}"),
        }
    }
    let mut out = Vec::new();
    go("", tree, &mut out);
    out
}

/// Every path in `code`, as written: `(path, is_reexport)`. `use` trees are expanded; a
/// `pub use` (any visibility) is a re-export.
fn paths(code: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut rest = code;
    let mut offset = 0;
    // The code with its `use` statements blanked, for the expression scan below.
    let mut exprs = code.to_string();
    while let Some(at) = find_word(rest, "use") {
        let before = code[..offset + at].trim_end();
        let public = before.ends_with("pub") || before.ends_with(')') && before.contains("pub(");
        let after = &rest[at + 3..];
        let Some(end) = after.find(';') else { break };
        out.extend(expand_use(&after[..end]).into_iter().map(|p| (p, public)));
        let (from, to) = (offset + at, offset + at + 3 + end);
        exprs.replace_range(from..to, &" ".repeat(to - from));
        offset += at + 3 + end;
        rest = &after[end..];
    }
    // Paths in expressions and types.
    let chars: Vec<char> = exprs.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let starts_word = c.is_alphabetic() || c == '_';
        let prev_ok = i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if starts_word && prev_ok {
            let mut j = i;
            while j < chars.len()
                && (chars[j].is_alphanumeric()
                    || chars[j] == '_'
                    || (chars[j] == ':' && chars.get(j + 1) == Some(&':'))
                    || (chars[j] == ':' && j > 0 && chars[j - 1] == ':'))
            {
                j += 1;
            }
            let p: String = chars[i..j].iter().collect();
            if p.contains("::") {
                out.push((p.trim_end_matches(':').to_string(), false));
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

fn find_word(s: &str, w: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(k) = s[from..].find(w) {
        let at = from + k;
        let before = s[..at].chars().last();
        let after = s[at + w.len()..].chars().next();
        let boundary = |c: Option<char>| !c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        if boundary(before) && after.is_some_and(char::is_whitespace) {
            return Some(at);
        }
        from = at + w.len();
    }
    None
}

/// What the resolver knows of the crate: its modules and what each re-exports.
#[derive(Default)]
struct Crate {
    modules: BTreeSet<String>,
    /// module → re-exported name → the path its `pub use` names (written in that module).
    reexports: BTreeMap<String, BTreeMap<String, String>>,
}

impl Crate {
    /// The module whose item `path` (written in `module`) names: the longest module prefix,
    /// seen through re-exports (`super::PodMaps` names `registry` when the parent re-exports
    /// `registry::PodMaps`) and the names `use` brought in (`aliases`: name → path).
    fn resolve(
        &self,
        module: &str,
        path: &str,
        aliases: &BTreeMap<String, String>,
        depth: usize,
    ) -> Option<String> {
        if depth > 8 {
            return None;
        }
        let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let mut base: Vec<String> = Vec::new();
        let mut k = 0;
        match segs.first().copied()? {
            "crate" => k = 1,
            "self" => {
                base = split(module);
                k = 1;
            }
            "super" => {
                base = split(module);
                while segs.get(k) == Some(&"super") {
                    base.pop()?;
                    k += 1;
                }
            }
            first => {
                let child = join(module, first);
                if self.modules.contains(&child) {
                    base = split(&child);
                    k = 1;
                } else {
                    let mut full = aliases.get(first)?.clone();
                    for s in &segs[1..] {
                        full = format!("{full}::{s}");
                    }
                    return self.resolve(module, &full, aliases, depth + 1);
                }
            }
        }
        let mut cur = base;
        while k < segs.len() {
            let mut next = cur.clone();
            next.push(segs[k].to_string());
            if self.modules.contains(&next.join("::")) {
                cur = next;
                k += 1;
            } else {
                break;
            }
        }
        let m = cur.join("::");
        if let Some(target) = segs
            .get(k)
            .and_then(|name| self.reexports.get(&m)?.get(*name))
        {
            let mut full = target.clone();
            for s in &segs[k + 1..] {
                full = format!("{full}::{s}");
            }
            if let Some(r) = self.resolve(&m, &full, &BTreeMap::new(), depth + 1) {
                return Some(r);
            }
        }
        Some(m)
    }
}

fn split(m: &str) -> Vec<String> {
    if m.is_empty() {
        vec![]
    } else {
        m.split("::").map(str::to_string).collect()
    }
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}::{b}")
    }
}

fn last_segment(p: &str) -> &str {
    p.rsplit("::").next().unwrap_or(p)
}

/// module → the modules its own code uses. A `pub use` is not an edge of the module that
/// re-exports (a facade shows its rooms, it does not depend on them); paths through it are
/// followed to the room that defines the item.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// module → used module → the first path (as written) that uses it.
fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    // main.rs is the binary's root, not a module of the library; its `interceptor::…` paths
    // name the library from outside, so it cannot be part of a cycle.
    files.retain(|f| f.file_name().is_none_or(|n| n != "main.rs"));
    let mut krate = Crate::default();
    let mut parsed = Vec::new();
    for f in &files {
        let m = module_of(src, f);
        krate.modules.insert(m.clone());
        let code = without_test_modules(&code_only(&std::fs::read_to_string(f).unwrap()));
        let ps = paths(&code);
        let re: BTreeMap<String, String> = ps
            .iter()
            .filter(|(_, public)| *public)
            .map(|(p, _)| (last_segment(p).to_string(), p.clone()))
            .collect();
        krate.reexports.insert(m.clone(), re);
        parsed.push((m, ps));
    }
    let mut g = BTreeMap::new();
    for (m, ps) in parsed {
        // `use a::b::c;` makes `c` name `a::b::c` for later `c::x` paths.
        let aliases: BTreeMap<String, String> = ps
            .iter()
            .filter(|(p, public)| !public && p.contains("::"))
            .map(|(p, _)| (last_segment(p).to_string(), p.clone()))
            .filter(|(name, p)| !p.starts_with(&format!("{name}::")))
            .collect();
        let mut deps = BTreeMap::new();
        for (p, _) in ps.iter().filter(|(_, public)| !public) {
            match krate.resolve(&m, p, &aliases, 0) {
                // The crate root only declares modules; a path through it names one below.
                Some(d) if d != m && !d.is_empty() => {
                    deps.entry(d).or_insert_with(|| p.clone());
                }
                _ => {}
            }
        }
        g.insert(m, deps);
    }
    g
}

/// Strongly connected components with more than one module (Tarjan), each with one cycle in it.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        sccs: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flat_map(BTreeMap::keys) {
            let w = w.as_str();
            if !t.g.contains_key(w) {
                continue;
            }
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w);
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                t.sccs.push(scc);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        sccs: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    // One concrete cycle per component: a shortest path from its first member back to itself.
    t.sccs
        .into_iter()
        .map(|scc| {
            let members: BTreeSet<&str> = scc.iter().copied().collect();
            let start = *members.iter().next().unwrap();
            let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
            let mut queue = std::collections::VecDeque::from([start]);
            let mut back = None;
            while let Some(v) = queue.pop_front() {
                for w in g[v].keys() {
                    let w = w.as_str();
                    if w == start {
                        back = Some(v);
                        queue.clear();
                        break;
                    }
                    if members.contains(w) && !prev.contains_key(w) {
                        prev.insert(w, v);
                        queue.push_back(w);
                    }
                }
            }
            let mut path = vec![start.to_string()];
            let mut v = back.expect("a component has a cycle");
            let mut rev = vec![];
            while v != start {
                rev.push(v.to_string());
                v = prev[v];
            }
            rev.reverse();
            path.extend(rev);
            path.push(start.to_string());
            let mut all: Vec<String> = scc.iter().map(|s| s.to_string()).collect();
            all.sort();
            path.push(format!("(component: {})", all.join(", ")));
            path
        })
        .collect()
}

#[test]
fn no_module_cycle_in_interceptor_src() {
    let src = repo().join("interceptor/src");
    let g = graph(&src);
    // The checker itself must see the edges it is meant to see.
    assert!(g.len() > 20, "found only {} modules", g.len());
    assert!(
        g.get("daemon")
            .is_some_and(|d| d.contains_key("daemon::protocol")),
        "daemon → daemon::protocol not seen: {:?}",
        g.get("daemon")
    );
    let found = cycles(&g);
    let text: Vec<String> = found
        .iter()
        .map(|c| {
            let (comp, path) = c.split_last().unwrap();
            let how: Vec<String> = path
                .windows(2)
                .map(|w| format!("    {} uses {}", w[0], g[&w[0]][&w[1]]))
                .collect();
            format!("  {}  {comp}\n{}", path.join(" → "), how.join("\n"))
        })
        .collect();
    assert!(
        found.is_empty(),
        "module cycles in interceptor/src (front ends → services → backends → facts → model; \
         nothing imports its way back up):\n{}",
        text.join("\n")
    );
}

#[test]
fn the_cycle_checker_sees_cycles() {
    let g: Graph = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a", "d"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| {
        let deps = v.into_iter().map(|d| (d.to_string(), String::new()));
        (k.to_string(), deps.collect())
    })
    .collect();
    let c = cycles(&g);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(&c[0][..4], ["a", "b", "c", "a"]);

    let mut krate = Crate::default();
    for m in [
        "cli",
        "daemon",
        "daemon::protocol",
        "backend",
        "backend::ebpf",
        "backend::ebpf::pins",
    ] {
        krate.modules.insert(m.into());
    }
    krate.reexports.insert(
        "backend::ebpf".into(),
        [("Pins".to_string(), "pins::Pins".to_string())].into(),
    );
    let code = without_test_modules(&code_only(
        "use crate::{cli::X, backend::{self, ebpf::Pins}};\n\
         pub use crate::daemon::protocol::Request;\n\
         // use crate::daemon;\n\
         let s = \"crate::daemon\";\n\
         fn f() { protocol::Request::Ping; super::cli::Y; backend::ebpf::Pins::new(); }\n\
         #[cfg(test)]\nmod tests { use crate::daemon::protocol; }\n",
    ));
    let deps: BTreeSet<String> = paths(&code)
        .iter()
        .filter(|(_, public)| !public)
        .filter_map(|(p, _)| krate.resolve("daemon", p, &BTreeMap::new(), 0))
        .filter(|d| !d.is_empty())
        .collect();
    let want: BTreeSet<String> = ["cli", "backend", "backend::ebpf::pins", "daemon::protocol"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(deps, want);
}

/// Rooms over `MAX_LINES` lines.
fn oversized() -> Vec<String> {
    let mut out = Vec::new();
    for dir in ["interceptor/src", "interceptor-ebpf/src"] {
        let mut files = Vec::new();
        rust_files(&repo().join(dir), &mut files);
        for f in files {
            let n = std::fs::read_to_string(&f).unwrap().lines().count();
            if n > MAX_LINES {
                let rel = f.strip_prefix(repo()).unwrap_or(&f).display().to_string();
                out.push(format!("{rel}: {n} lines"));
            }
        }
    }
    out
}

#[test]
fn no_file_over_700_lines() {
    let big = oversized();
    assert!(
        big.is_empty(),
        "files over {MAX_LINES} lines in interceptor/src or interceptor-ebpf/src (split them by \
         concern):\n  {}",
        big.join("\n  ")
    );
}
