//! One error style for bad input, whichever layer finds it:
//! `interceptor: invalid value "V" for --flag: why`, naming the environment variable instead when
//! the value came from one (`for DRY_RUN (environment; flag --dry-run)`). clap's own usage errors
//! (an enum value, a Go boolean, an unknown flag) are rewritten into that style; `--help` and
//! `--version` pass through untouched.

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use interceptor_common::config::ConfigError;

use super::Cli;

/// A command line that parsed, with clap's record of where each value came from.
pub struct Parsed {
    pub cli: Cli,
    matches: ArgMatches,
}

/// Why parsing stopped.
pub enum Stop {
    /// Help or version output: print it as clap does (`clap::Error::exit`).
    Display(clap::Error),
    /// A usage error in our style, without the `interceptor: ` prefix; exit 2.
    Usage(String),
}

/// Parses `argv` (program name first).
pub fn parse_from<I, T>(argv: I) -> Result<Parsed, Stop>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let mut cmd = Cli::command();
    let result = cmd
        .try_get_matches_from_mut(&argv)
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| Parsed { cli, matches: m }));
    let parsed = result.map_err(|e| match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => Stop::Display(e),
        _ => Stop::Usage(usage_message(&cmd, &e, &argv)),
    })?;
    refuse_hidden(&cmd, &parsed.matches)?;
    Ok(parsed)
}

/// A flag a command hides from its help does nothing there: given on the command line, it is
/// an error rather than silently ignored (from the environment it is ignored, as istio-iptables'
/// variables may be set for another command).
fn refuse_hidden(cmd: &clap::Command, root: &ArgMatches) -> Result<(), Stop> {
    let (sub, path, m) = leaf(cmd, root);
    let given = sub.get_arguments().find(|a| {
        a.is_hide_set() && m.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine)
    });
    match given {
        None => Ok(()),
        Some(a) => Err(Stop::Usage(format!(
            "--{} does nothing for `{path}`: it is not one of that command's flags (see `{path} --help`)",
            a.get_long().unwrap_or(a.get_id().as_str()),
        ))),
    }
}

impl Parsed {
    /// `e` as the user should read it: the environment variable named when the flag's value
    /// came from one.
    pub fn describe(&self, e: &ConfigError) -> String {
        let (sub, _, m) = leaf(&Cli::command(), &self.matches);
        let from_env = arg_named(&sub, e.flag)
            .filter(|a| m.value_source(a.get_id().as_str()) == Some(ValueSource::EnvVariable))
            .and_then(|a| a.get_env());
        match from_env {
            Some(var) => invalid(
                &e.value,
                &env_source(&var.to_string_lossy(), e.flag),
                &e.reason,
            ),
            None => e.to_string(),
        }
    }
}

fn invalid(value: &str, source: &str, why: &str) -> String {
    format!("invalid value {value:?} for {source}: {why}")
}

fn env_source(var: &str, flag: &str) -> String {
    format!("{var} (environment; flag {flag})")
}

/// The subcommand `m` ended in, its path as typed (`interceptor pod add`), and its matches.
fn leaf<'a>(cmd: &clap::Command, m: &'a ArgMatches) -> (clap::Command, String, &'a ArgMatches) {
    let (mut cur, mut path, mut m) = (cmd.clone(), cmd.get_name().to_string(), m);
    while let Some((name, sm)) = m.subcommand() {
        let Some(sub) = cur.find_subcommand(name).cloned() else {
            break;
        };
        path = format!("{path} {name}");
        (cur, m) = (sub, sm);
    }
    (cur, path, m)
}

/// The argument of `sub` that `flag` names (`--long` or `-s`).
fn arg_named<'a>(sub: &'a clap::Command, flag: &str) -> Option<&'a clap::Arg> {
    sub.get_arguments().find(|a| match flag.strip_prefix("--") {
        Some(long) => a.get_long() == Some(long),
        None => {
            flag.len() == 2
                && flag.strip_prefix('-').and_then(|s| s.chars().next()) == a.get_short()
        }
    })
}

/// The subcommand named by the leading words of `argv`, its path as typed
/// (`interceptor pod add`), and the words after them.
fn leaf_of_argv<'a>(
    cmd: &clap::Command,
    argv: &'a [OsString],
) -> (clap::Command, String, &'a [OsString]) {
    let mut cur = cmd.clone();
    let mut path = vec![cmd.get_name().to_string()];
    let mut rest = argv.get(1..).unwrap_or_default();
    while let Some(sub) = rest
        .first()
        .and_then(|w| w.to_str())
        .and_then(|w| cur.find_subcommand(w))
        .cloned()
    {
        path.push(sub.get_name().to_string());
        cur = sub;
        rest = &rest[1..];
    }
    (cur, path.join(" "), rest)
}

fn context_str(e: &clap::Error, kind: ContextKind) -> Option<String> {
    match e.get(kind)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) => Some(v.join(", ")),
        _ => None,
    }
}

/// clap's error in our style.
fn usage_message(cmd: &clap::Command, e: &clap::Error, argv: &[OsString]) -> String {
    let (sub, path, words) = leaf_of_argv(cmd, argv);
    let help = format!("see `{path} --help`");
    let value = context_str(e, ContextKind::InvalidValue);
    let arg = context_str(e, ContextKind::InvalidArg);
    match (e.kind(), value, arg) {
        (ErrorKind::InvalidValue | ErrorKind::ValueValidation, Some(value), Some(arg)) => {
            // "--backend <BACKEND>", "--dry-run[=<DRY_RUN>]", "-i <CIDRS>": the flag itself.
            let flag = arg
                .split([' ', '[', '='])
                .next()
                .unwrap_or(&arg)
                .to_string();
            let why = match e.kind() {
                ErrorKind::ValueValidation => std::error::Error::source(e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "not accepted".into()),
                _ if value.is_empty() => "a value is required".into(),
                _ => match context_str(e, ContextKind::ValidValue) {
                    Some(valid) => format!("expected one of: {valid}"),
                    None => "not accepted".into(),
                },
            };
            let source = match env_var_used(&sub, &flag, words) {
                Some(var) => env_source(&var, &flag),
                None => flag,
            };
            format!("{} ({help})", invalid(&value, &source, &why))
        }
        _ => {
            // Unknown or missing flags and the like: clap's sentence (its continuation lines
            // name the flags), without its usage block.
            let rendered = e.render().to_string();
            let lines: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                .filter(|l| !l.is_empty())
                .collect();
            let sentence: Vec<&str> = lines
                .iter()
                .filter(|l| !l.starts_with("tip:"))
                .map(|l| l.strip_prefix("error: ").unwrap_or(l))
                .collect();
            let mut msg = match sentence.join(" ") {
                s if s.is_empty() => format!("bad command line ({help})"),
                s => format!("{s} ({help})"),
            };
            for tip in lines.iter().filter(|l| l.starts_with("tip:")) {
                msg.push_str("\n  ");
                msg.push_str(tip);
            }
            msg
        }
    }
}

/// The environment variable that gave `flag` its value: the flag is not on the command line and
/// its variable is set.
fn env_var_used(sub: &clap::Command, flag: &str, words: &[OsString]) -> Option<String> {
    let arg = arg_named(sub, flag)?;
    let var = arg.get_env()?.to_string_lossy().into_owned();
    let on_line = words.iter().filter_map(|w| w.to_str()).any(|w| {
        arg.get_long()
            .is_some_and(|l| w == format!("--{l}") || w.starts_with(&format!("--{l}=")))
            || arg.get_short().is_some_and(|s| {
                w.starts_with('-')
                    && !w.starts_with("--")
                    && w.get(1..).is_some_and(|r| r.starts_with(s))
            })
    });
    (!on_line && std::env::var_os(&var).is_some()).then_some(var)
}
