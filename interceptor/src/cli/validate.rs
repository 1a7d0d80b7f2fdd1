//! `interceptor validate`'s arguments (istio-validation's flags), parsed into the validation's
//! typed params.

use std::path::PathBuf;

use clap::Args;
use interceptor_common::config::ConfigError;
use interceptor_common::defaults;

use crate::validate::Params;

#[derive(Args, Debug, Clone)]
pub struct ValidateArgs {
    /// Validate inside this network namespace (a path such as /var/run/netns/NAME).
    #[arg(long, env = "NETWORK_NAMESPACE")]
    pub network_namespace: Option<PathBuf>,
    /// Outbound redirect target port (listened on).
    #[arg(short = 'p', long = "envoy-port", default_value_t = defaults::PROXY_PORT.to_string())]
    pub envoy_port: String,
    /// Inbound redirect target port (listened on).
    #[arg(
        short = 'z',
        long,
        env = "INBOUND_CAPTURE_PORT",
        default_value_t = defaults::INBOUND_CAPTURE_PORT.to_string()
    )]
    pub inbound_capture_port: String,
    /// Port the probes dial (127.0.0.6:PORT inbound, 192.0.2.1:PORT outbound).
    #[arg(long, default_value = "15002")]
    pub iptables_probe_port: String,
    /// Give up after this long (Go duration, e.g. 5s); probes are sent every second.
    #[arg(long, default_value = "5s")]
    pub probe_timeout: String,
    /// uid the listeners and the inbound probe run as.
    #[arg(long, default_value_t = defaults::PROXY_UID.to_string())]
    pub proxy_uid: String,
    /// gid the listeners and the inbound probe run as (default: the uid).
    #[arg(long)]
    pub proxy_gid: Option<String>,
    /// Validate inside this pod, as namespace/name, looked up among the pods registered with
    /// the daemon (instead of --network-namespace).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub pod: Option<String>,
    /// The daemon's control socket, where --pod is looked up.
    #[arg(
        long,
        env = "INTERCEPTOR_SOCKET",
        default_value = "/run/interceptor/interceptor.sock"
    )]
    pub socket: PathBuf,
}

fn port(flag: &'static str, s: &str) -> Result<u16, ConfigError> {
    s.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ConfigError::new(flag, s, "not a port number (1-65535)"))
}

fn id(flag: &'static str, s: &str) -> Result<u32, ConfigError> {
    s.trim()
        .parse::<u32>()
        .map_err(|_| ConfigError::new(flag, s, "not a numeric id (0-4294967295)"))
}

impl ValidateArgs {
    /// `--pod` resolved to its netns through the daemon (an unknown pod is an error naming it).
    pub fn resolved(&self) -> anyhow::Result<Result<ValidateArgs, ConfigError>> {
        let Some(pod) = &self.pod else {
            return Ok(Ok(self.clone()));
        };
        if let Some(e) = super::pod_ref::both_given(pod) {
            return Ok(Err(e));
        }
        Ok(
            super::pod_ref::registered(&self.socket, pod)?.map(|status| ValidateArgs {
                network_namespace: Some(status.netns),
                pod: None,
                ..self.clone()
            }),
        )
    }

    /// Checks the flags; bad input is a `ConfigError` (exit 2), nothing is probed.
    pub fn params(&self) -> Result<Params, ConfigError> {
        let a = self;
        if let Some(ns) = &a.network_namespace {
            crate::config::check_netns(ns)?;
        }
        let proxy_port = port("--envoy-port", &a.envoy_port)?;
        let inbound_capture_port = port("--inbound-capture-port", &a.inbound_capture_port)?;
        let probe_port = port("--iptables-probe-port", &a.iptables_probe_port)?;
        let timeout = crate::config::parse_go_duration(&a.probe_timeout).ok_or_else(|| {
            ConfigError::new(
                "--probe-timeout",
                &a.probe_timeout,
                "not a positive duration such as 5s or 500ms",
            )
        })?;
        let proxy_uid = id("--proxy-uid", &a.proxy_uid)?;
        let proxy_gid = match &a.proxy_gid {
            Some(g) => id("--proxy-gid", g)?,
            None => proxy_uid,
        };
        Params {
            netns: a.network_namespace.clone(),
            proxy_port,
            inbound_capture_port,
            probe_port,
            timeout,
            timeout_text: a.probe_timeout.trim().to_string(),
            proxy_uid,
            proxy_gid,
        }
        .checked()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Params, ConfigError> {
        let mut argv = vec!["interceptor", "validate"];
        argv.extend_from_slice(args);
        let cli = crate::cli::Cli::try_parse_from(argv).expect("clap");
        match cli.command {
            crate::cli::Command::Validate(a) => a.params(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_are_istios() {
        let p = parse(&[]).unwrap();
        assert_eq!(
            (p.proxy_port, p.inbound_capture_port, p.probe_port),
            (15001, 15006, 15002)
        );
        assert_eq!(p.timeout, Duration::from_secs(5));
        assert_eq!((p.proxy_uid, p.proxy_gid), (1337, 1337));
    }

    #[test]
    fn flags() {
        let p = parse(&[
            "-p",
            "16001",
            "-z",
            "16006",
            "--iptables-probe-port",
            "16002",
            "--probe-timeout",
            "500ms",
            "--proxy-uid",
            "65534",
        ])
        .unwrap();
        assert_eq!(
            (p.proxy_port, p.inbound_capture_port, p.probe_port),
            (16001, 16006, 16002)
        );
        assert_eq!(p.timeout, Duration::from_millis(500));
        assert_eq!((p.proxy_uid, p.proxy_gid), (65534, 65534));
    }

    #[test]
    fn bad_flags_name_the_flag() {
        for (args, flag) in [
            (&["-p", "0"][..], "--envoy-port"),
            (&["-z", "x"][..], "--inbound-capture-port"),
            (&["-z", "15001"][..], "--inbound-capture-port"),
            (
                &["--iptables-probe-port", "70000"][..],
                "--iptables-probe-port",
            ),
            (&["--probe-timeout", "5"][..], "--probe-timeout"),
            (&["--probe-timeout", "0s"][..], "--probe-timeout"),
            (&["--proxy-uid=-1"][..], "--proxy-uid"),
            (&["--proxy-gid", "abc"][..], "--proxy-gid"),
            (
                &["--network-namespace", "/nonexistent/netns"][..],
                "--network-namespace",
            ),
            (
                &["--network-namespace", "/etc/hostname"][..],
                "--network-namespace",
            ),
        ] {
            let e = parse(args).expect_err(&format!("{args:?} accepted"));
            assert_eq!(e.flag, flag, "{args:?}");
        }
    }
}
