//! Replacing pinned programs in place, with no moment where a hook runs nothing.
//!
//! The pin folder records, last of all, a *layout version* and a *program identity* in a marker:
//! a symlink named `layout` (bpffs holds only pins, folders and symlinks) whose target reads
//! `layout=<N> programs=<hex>`, written as `layout-new` and renamed over the old one. The
//! layout ([`LAYOUT_VERSION`]) covers what outlives a binary: the maps' keys and values, the pin
//! tree, and the per-pod sk_lookup program's contract (it reads `POD_NETNS[id]` into
//! `INBOUND_NETNS[0]` and tail-calls `INBOUND_PROG[0]`). The identity is a hash of the object
//! and the globals it is loaded with, so a newer binary or another `--log` differs.
//!
//! On load ([`Pins::ensure_loaded_with`]):
//! - no marker and nothing pinned (or a half-finished load, or pins older than layout 1, which
//!   have no `POD_NETNS`): a fresh load (`pins.rs`); for those older pins that means detaching
//!   them first — a short window, as before: they predate everything this module relies on;
//! - no marker but a complete installation (`POD_NETNS` pinned): the release before markers
//!   (commit 0fd318a), which is layout 1, identity unknown, so its programs are replaced;
//! - a higher layout than this binary knows: a downgrade, refused; nothing changes;
//! - this layout and this identity, everything pinned: nothing to do;
//! - otherwise the programs are replaced: maps that kept their type, key and value sizes are
//!   reused (aya opens the pins); one that changed is refused before anything changes, naming
//!   the map and both layouts. Then each new program is loaded and swapped in atomically:
//!   `BPF_LINK_UPDATE` (with `BPF_F_REPLACE`) on each pinned cgroup link, `BPF_PROG_ATTACH` with
//!   `BPF_F_REPLACE` for getsockopt, the new `ic_sk_lookup` into `INBOUND_PROG[0]` (one map
//!   write), `ic_sk_msg` attached to `ACCEL` again (the kernel exchanges a sockmap's program in
//!   one step; sockets already in the map keep the program they were added with until they
//!   close). Then `progs/` is pinned again (rename over the old pins) and the marker written.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::ProgramArray;
use aya::Ebpf;
use interceptor_common::maps::names;

use super::pins::{
    accel_fd, attach_cgroup_link, bpffs_mounted, load_cgroup_program, load_getsockopt,
    load_sk_lookup, load_sk_msg, Globals,
};
use super::sys::{self, MapLayout};
use super::{
    Pins, GETSOCKOPT_PROGRAM, LEGACY_MAPS, LINKED_PROGRAMS, MAPS, OBJECT, SK_LOOKUP_PROGRAM,
    SK_MSG_PROGRAM,
};

/// The layout of what stays pinned across binaries (see the module docs). Bump it whenever a
/// map's key or value, the pin tree or the per-pod program's contract changes, and teach
/// [`Pins::upgrade`] the migration from the previous one (or let it refuse).
pub const LAYOUT_VERSION: u32 = 1;

/// The marker's name in the pin folder.
const MARKER: &str = "layout";
/// Written first, then renamed over [`MARKER`] (bpffs refuses names with a dot).
const MARKER_NEW: &str = "layout-new";

/// What the marker (or its absence) says about a pinned installation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Layout {
    pub version: u32,
    /// The program identity; None for the release before markers.
    pub identity: Option<String>,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.identity {
            Some(id) => write!(f, "layout {}, programs {id}", self.version),
            None => write!(
                f,
                "layout {}, programs of a release before layout markers",
                self.version
            ),
        }
    }
}

/// What loading did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// The programs of this binary and settings were attached already.
    Already,
    /// Loaded and attached now (nothing of layout 1 or later was pinned).
    Fresh,
    /// The pinned programs were replaced in place.
    Upgraded(Swap),
}

impl Loaded {
    /// Whether this call changed the programs.
    pub fn changed(&self) -> bool {
        !matches!(self, Loaded::Already)
    }
}

/// The programs an upgrade replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    /// The identity replaced (None: pinned before markers).
    pub from: Option<String>,
    pub to: String,
    /// Each program with the kernel id it replaced (None: it was not attached) and its new id.
    pub programs: Vec<(&'static str, Option<u32>, u32)>,
}

impl fmt::Display for Swap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, old, new)) in self.programs.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            match old {
                Some(old) => write!(f, "{sep}{name} {old}→{new}")?,
                None => write!(f, "{sep}{name} (new) {new}")?,
            }
        }
        Ok(())
    }
}

fn parse_marker(s: &str) -> Option<Layout> {
    let (layout, programs) = s.split_once(' ')?;
    Some(Layout {
        version: layout.strip_prefix("layout=")?.parse().ok()?,
        identity: Some(programs.strip_prefix("programs=")?.to_string()),
    })
}

/// The kernel's name of a map type, for messages.
fn map_type_name(t: u32) -> String {
    const NAMES: &[&str] = &[
        "unspec",
        "hash",
        "array",
        "prog_array",
        "perf_event_array",
        "percpu_hash",
        "percpu_array",
        "stack_trace",
        "cgroup_array",
        "lru_hash",
        "lru_percpu_hash",
        "lpm_trie",
        "array_of_maps",
        "hash_of_maps",
        "devmap",
        "sockmap",
        "cpumap",
        "xskmap",
        "sockhash",
        "cgroup_storage",
        "reuseport_sockarray",
        "percpu_cgroup_storage",
        "queue",
        "stack",
        "sk_storage",
    ];
    NAMES
        .get(t as usize)
        .map_or_else(|| format!("type {t}"), |n| n.to_string())
}

fn describe(l: MapLayout) -> String {
    format!(
        "{} with {}-byte keys and {}-byte values",
        map_type_name(l.map_type),
        l.key_size,
        l.value_size
    )
}

impl Pins {
    /// Loads the programs and attaches them at `cgroup`, or finds them loaded, or replaces in
    /// place the programs an earlier binary (or other settings) pinned (see `upgrade.rs`).
    /// Maps already pinned are reused (their entries survive).
    pub fn ensure_loaded(&self, cgroup: &Path, log: bool) -> Result<Loaded> {
        self.ensure_loaded_with(cgroup, log, true)
    }

    /// `ensure_loaded`, choosing whether the programs count per pod (`count` false prunes the
    /// counting code; the benchmark uses it to show what counting costs).
    pub fn ensure_loaded_with(&self, cgroup: &Path, log: bool, count: bool) -> Result<Loaded> {
        let globals = Globals::new(log, count);
        match self.layout()? {
            Some(found) => self.upgrade(cgroup, &globals, found),
            None => self.load_fresh(cgroup, &globals).map(|()| Loaded::Fresh),
        }
    }

    /// Loads and attaches everything where nothing of layout 1 or later is pinned (nothing, a
    /// half-finished load, or an installation older than layout 1: those start from a clean
    /// slate, keeping the maps), then writes the layout marker.
    fn load_fresh(&self, cgroup: &Path, globals: &Globals) -> Result<()> {
        if !bpffs_mounted(&self.dir) {
            bail!(
                "no bpffs mounted above {} (mount -t bpf bpf /sys/fs/bpf)",
                self.dir.display()
            );
        }
        self.detach_all(Some(cgroup));
        for m in LEGACY_MAPS.iter().chain(names::LEGACY) {
            let _ = std::fs::remove_file(self.map(m));
        }
        // Earlier versions pinned ORIG_BY_TUPLE as an LRU: its entries only matter while the
        // programs run, so an old one goes (with the counts that describe it).
        let tuple_pin = self.map(names::ORIG_BY_TUPLE);
        if let Ok(info) = aya::maps::MapInfo::from_pin(&tuple_pin) {
            if !matches!(info.map_type(), Ok(aya::maps::MapType::Hash)) {
                let _ = std::fs::remove_file(&tuple_pin);
                let _ = std::fs::remove_file(self.map(names::TUPLE_COUNT));
            }
        }
        for sub in ["maps", "links", "progs"] {
            std::fs::create_dir_all(self.dir.join(sub))
                .with_context(|| format!("creating {}", self.dir.display()))?;
        }
        crate::progress::step(format!(
            "loading the eBPF programs (the kernel's verifier checks each; a few seconds) under {}",
            self.dir.display()
        ));
        let mut ebpf = self.load_object(globals)?;
        crate::progress::step(format!("attaching them to the cgroup {}", cgroup.display()));
        let result = self
            .attach(&mut ebpf, cgroup)
            .and_then(|()| self.write_marker(&globals.identity()));
        if result.is_err() {
            self.detach_all(Some(cgroup));
        }
        result
    }

    /// Detaches and unpins everything of ours, maps included (`Pins::cleanup` releases the
    /// pods' reserved ports first).
    pub(super) fn unpin_all(&self, cgroup: &Path) -> Result<bool> {
        if !self.dir.exists() {
            return Ok(false);
        }
        self.remove_marker();
        crate::progress::step(format!(
            "detaching the programs from the cgroup {}",
            cgroup.display()
        ));
        self.detach_all(Some(cgroup));
        crate::progress::step(format!("unpinning the maps under {}", self.dir.display()));
        for m in MAPS
            .iter()
            .chain(LEGACY_MAPS)
            .chain(names::LEGACY)
            .chain(["AYA_LOGS"].iter())
        {
            let _ = std::fs::remove_file(self.map(m));
        }
        for sub in ["maps", "links", "progs"] {
            let _ = std::fs::remove_dir(self.dir.join(sub));
        }
        std::fs::remove_dir(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))?;
        Ok(true)
    }

    /// The layout of what is pinned: the marker's, layout 1 without identity for a complete
    /// installation of the release before markers, None when nothing usable is pinned.
    pub fn layout(&self) -> Result<Option<Layout>> {
        let marker = self.dir.join(MARKER);
        match std::fs::read_link(&marker) {
            Ok(target) => {
                let text = target.to_string_lossy();
                parse_marker(&text).map(Some).ok_or_else(|| {
                    anyhow!(
                        "unreadable layout marker {} ({text:?}): refusing to touch the programs \
                         pinned there (`interceptor cleanup` removes them all)",
                        marker.display()
                    )
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Ok(self.loaded_before_markers().then_some(Layout {
                    version: 1,
                    identity: None,
                }))
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", marker.display())),
        }
    }

    /// Writes the marker for this layout and `identity`: last, and atomically.
    pub(super) fn write_marker(&self, identity: &str) -> Result<()> {
        let new = self.dir.join(MARKER_NEW);
        let _ = std::fs::remove_file(&new);
        std::os::unix::fs::symlink(format!("layout={LAYOUT_VERSION} programs={identity}"), &new)
            .with_context(|| format!("writing {}", new.display()))?;
        std::fs::rename(&new, self.dir.join(MARKER))
            .with_context(|| format!("renaming {} into place", new.display()))
    }

    /// Removes the marker (cleanup).
    pub(super) fn remove_marker(&self) {
        let _ = std::fs::remove_file(self.dir.join(MARKER_NEW));
        let _ = std::fs::remove_file(self.dir.join(MARKER));
    }

    /// Brings an installation of layout `found` to this binary's programs (see the module docs).
    pub(super) fn upgrade(
        &self,
        cgroup: &Path,
        globals: &Globals,
        found: Layout,
    ) -> Result<Loaded> {
        let dir = self.dir.display();
        if found.version > LAYOUT_VERSION {
            bail!(
                "the programs pinned under {dir} are of a newer interceptor (layout {}; this \
                 binary knows layouts up to {LAYOUT_VERSION}): refusing to downgrade them; \
                 nothing was changed and they keep intercepting. To downgrade, drain the node, \
                 run `interceptor cleanup --bpffs {dir}` with the newer binary, then start this \
                 one",
                found.version
            );
        }
        if found.version < LAYOUT_VERSION {
            bail!(
                "the programs pinned under {dir} are of layout {}, and this binary (layout \
                 {LAYOUT_VERSION}) has no migration from it: nothing was changed. Drain the \
                 node, run `interceptor cleanup --bpffs {dir}`, then start this binary",
                found.version
            );
        }
        let to = globals.identity();
        if found.identity.as_deref() == Some(to.as_str()) && self.loaded() {
            return Ok(Loaded::Already);
        }
        self.check_maps()?;
        crate::progress::step(format!(
            "other programs are pinned under {dir}: loading and verifying this binary's to \
             replace them in place"
        ));
        let mut ebpf = self.load_object(globals)?;
        for name in LINKED_PROGRAMS {
            load_cgroup_program(&mut ebpf, name)?;
        }
        load_sk_lookup(&mut ebpf)?;
        load_getsockopt(&mut ebpf)?;
        load_sk_msg(&mut ebpf)?;
        // Everything is loaded and verified: from here on each step replaces one program.
        crate::progress::step("replacing the running programs one by one");
        let mut programs = Vec::new();
        let total = LINKED_PROGRAMS.len() + 3;
        self.swap_all(&mut ebpf, cgroup, &mut programs)
            .with_context(|| {
                format!(
                    "upgrade stopped after replacing {} of {total} programs (the others still \
                     run the earlier ones, on the same maps; the next start finishes it)",
                    programs.len()
                )
            })?;
        self.write_marker(&to)?;
        let swap = Swap {
            from: found.identity,
            to,
            programs,
        };
        tracing::info!(from = swap.from.as_deref().unwrap_or("a release before layout markers"),
            to = %swap.to, layout = LAYOUT_VERSION, programs = %swap, "upgraded programs in place");
        Ok(Loaded::Upgraded(swap))
    }

    /// Refuses (changing nothing) when a pinned map's type, key or value size is not what this
    /// binary's object defines: its programs would misread the map.
    fn check_maps(&self) -> Result<()> {
        let obj = aya_obj::Object::parse(OBJECT).context("parsing the eBPF object")?;
        let mut changed = Vec::new();
        for name in MAPS {
            let pin = self.map(name);
            let fd = match sys::obj_get(&pin) {
                Ok(fd) => fd,
                // Not pinned yet: created with this binary's layout.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("opening {}", pin.display())),
            };
            let have = sys::map_layout(fd.as_fd())
                .with_context(|| format!("reading the layout of {}", pin.display()))?;
            let def = obj
                .maps
                .get(*name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
            let mut want = MapLayout {
                map_type: def.map_type(),
                key_size: def.key_size(),
                value_size: def.value_size(),
                max_entries: def.max_entries(),
            };
            if crate::fault::map_layout_differs(name) {
                want.value_size += 1;
            }
            let shape = |l: MapLayout| (l.map_type, l.key_size, l.value_size);
            if shape(have) != shape(want) {
                changed.push(format!(
                    "{name}: pinned {}, this binary's {}",
                    describe(have),
                    describe(want)
                ));
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        bail!(
            "refusing to upgrade the programs pinned under {dir}: the layout of {} changed and \
             this binary has no migration for it ({}). Nothing was changed; the running \
             programs keep intercepting. To move to this binary: drain the node (or accept that \
             its pods lose interception until they are added again), run `interceptor cleanup \
             --bpffs {dir}`, start this binary and add the pods again",
            if changed.len() == 1 { "a map" } else { "maps" },
            changed.join("; "),
            dir = self.dir.display()
        )
    }

    /// Swaps every program for the loaded one of `ebpf`, recording each in `done`.
    fn swap_all(
        &self,
        ebpf: &mut Ebpf,
        cgroup: &Path,
        done: &mut Vec<(&'static str, Option<u32>, u32)>,
    ) -> Result<()> {
        let cg =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for name in LINKED_PROGRAMS {
            let new = program_fd(ebpf, name)?;
            let new_id = sys::prog_id(new.as_fd())?;
            let pin = self.link(name);
            match sys::obj_get(&pin) {
                Ok(link) => {
                    let old_id = sys::link_prog_id(link.as_fd())?;
                    let old = sys::prog_fd_by_id(old_id)
                        .with_context(|| format!("opening the program of {}", pin.display()))?;
                    sys::link_update(link.as_fd(), new.as_fd(), Some(old.as_fd()))
                        .with_context(|| format!("replacing the program of {}", pin.display()))?;
                    done.push((name, Some(old_id), new_id));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let link = attach_cgroup_link(ebpf, name, &cg)?;
                    link.pin(&pin)
                        .with_context(|| format!("pinning the link of {name}"))?;
                    done.push((name, None, new_id));
                }
                Err(e) => return Err(e).with_context(|| format!("opening {}", pin.display())),
            }
        }

        // getsockopt: attached with BPF_PROG_ATTACH (multi), replaced in its place.
        let new = program_fd(ebpf, GETSOCKOPT_PROGRAM)?;
        let new_id = sys::prog_id(new.as_fd())?;
        let pin = self.prog(GETSOCKOPT_PROGRAM);
        let attached = sys::prog_query(cg.as_fd(), sys::BPF_CGROUP_GETSOCKOPT, 0)?;
        let old = sys::obj_get(&pin).ok().and_then(|fd| {
            let id = sys::prog_id(fd.as_fd()).ok()?;
            attached.contains(&id).then_some((fd, id))
        });
        match &old {
            Some((fd, _)) => sys::prog_attach_replace(
                cg.as_fd(),
                new.as_fd(),
                fd.as_fd(),
                sys::BPF_CGROUP_GETSOCKOPT,
            ),
            None => sys::prog_attach(
                cg.as_fd(),
                new.as_fd(),
                sys::BPF_CGROUP_GETSOCKOPT,
                sys::BPF_F_ALLOW_MULTI,
            ),
        }
        .with_context(|| format!("replacing {GETSOCKOPT_PROGRAM}"))?;
        repin(new.as_fd(), &pin)?;
        done.push((GETSOCKOPT_PROGRAM, old.map(|(_, id)| id), new_id));

        // sk_lookup: what every pod's own program tail-calls; one map write.
        let new = program_fd(ebpf, SK_LOOKUP_PROGRAM)?;
        let new_id = sys::prog_id(new.as_fd())?;
        let old_id = self.inbound_program();
        let mut inbound = ProgramArray::try_from(
            ebpf.map_mut(names::INBOUND_PROG)
                .ok_or_else(|| anyhow!("map {} missing", names::INBOUND_PROG))?,
        )?;
        inbound
            .set(0, &new, 0)
            .with_context(|| format!("putting {SK_LOOKUP_PROGRAM} into INBOUND_PROG"))?;
        repin(new.as_fd(), &self.prog(SK_LOOKUP_PROGRAM))?;
        done.push((SK_LOOKUP_PROGRAM, old_id, new_id));

        // sk_msg: attaching to the sockmap again exchanges its program.
        let new = program_fd(ebpf, SK_MSG_PROGRAM)?;
        let new_id = sys::prog_id(new.as_fd())?;
        let pin = self.prog(SK_MSG_PROGRAM);
        let old_id = sys::obj_get(&pin)
            .ok()
            .and_then(|fd| sys::prog_id(fd.as_fd()).ok());
        let accel = accel_fd(ebpf)?;
        sys::prog_attach(accel.as_fd(), new.as_fd(), sys::BPF_SK_MSG_VERDICT, 0)
            .with_context(|| format!("attaching {SK_MSG_PROGRAM} to ACCEL"))?;
        repin(new.as_fd(), &pin)?;
        done.push((SK_MSG_PROGRAM, old_id, new_id));
        Ok(())
    }

    /// The id of the program in `INBOUND_PROG[0]` (what the pods' sk_lookup programs run).
    fn inbound_program(&self) -> Option<u32> {
        let map = sys::obj_get(&self.map(names::INBOUND_PROG)).ok()?;
        let mut id = [0u8; 4];
        sys::map_lookup(map.as_fd(), &0u32.to_ne_bytes(), &mut id).ok()?;
        Some(u32::from_ne_bytes(id))
    }

    /// The kernel id of the program running at each of our hooks (None: nothing of ours there):
    /// behind each cgroup link, getsockopt (if attached at `cgroup`), `INBOUND_PROG[0]`, and
    /// the sk_msg program the kernel reports for `ACCEL` (the pinned one where the kernel
    /// cannot say). What an upgrade changes; the tests compare them.
    pub fn running_programs(&self, cgroup: &Path) -> Vec<(&'static str, Option<u32>)> {
        let mut out: Vec<(&'static str, Option<u32>)> = LINKED_PROGRAMS
            .iter()
            .map(|name| {
                let id = sys::obj_get(&self.link(name))
                    .and_then(|l| sys::link_prog_id(l.as_fd()))
                    .ok();
                (*name, id)
            })
            .collect();
        let pinned = |name: &str| {
            sys::obj_get(&self.prog(name))
                .and_then(|fd| sys::prog_id(fd.as_fd()))
                .ok()
        };
        let getsockopt = pinned(GETSOCKOPT_PROGRAM).filter(|id| {
            File::open(cgroup)
                .and_then(|cg| sys::prog_query(cg.as_fd(), sys::BPF_CGROUP_GETSOCKOPT, 0))
                .is_ok_and(|ids| ids.contains(id))
        });
        out.push((GETSOCKOPT_PROGRAM, getsockopt));
        out.push((SK_LOOKUP_PROGRAM, self.inbound_program()));
        let sk_msg = sys::obj_get(&self.map(names::ACCEL))
            .and_then(|m| sys::prog_query(m.as_fd(), sys::BPF_SK_MSG_VERDICT, 0))
            .ok()
            .map_or_else(|| pinned(SK_MSG_PROGRAM), |ids| ids.first().copied());
        out.push((SK_MSG_PROGRAM, sk_msg));
        out
    }
}

/// A descriptor of the loaded program `name` of `ebpf`.
fn program_fd(ebpf: &Ebpf, name: &str) -> Result<aya::programs::ProgramFd> {
    let prog = ebpf
        .program(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
    Ok(prog.fd()?.try_clone()?)
}

/// Pins `prog` at `pin` in place of what is pinned there (pinned beside it, then renamed over).
fn repin(prog: std::os::fd::BorrowedFd<'_>, pin: &Path) -> Result<()> {
    // Beside it, not `.new`: bpffs refuses names with a dot.
    let mut name = pin.file_name().unwrap_or_default().to_os_string();
    name.push("-new");
    let new = pin.with_file_name(name);
    let _ = std::fs::remove_file(&new);
    sys::obj_pin(prog, &new).with_context(|| format!("pinning {}", new.display()))?;
    std::fs::rename(&new, pin).with_context(|| format!("renaming {} into place", new.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips() {
        let l = parse_marker("layout=3 programs=00ff").unwrap();
        assert_eq!(l.version, 3);
        assert_eq!(l.identity.as_deref(), Some("00ff"));
        assert_eq!(parse_marker("layout=x programs=1"), None);
        assert_eq!(parse_marker("nonsense"), None);
    }

    #[test]
    fn identity_follows_the_globals() {
        let a = Globals::new(false, true);
        assert_eq!(a.identity(), Globals::new(false, true).identity());
        assert_ne!(a.identity(), Globals::new(true, true).identity());
        assert_ne!(a.identity(), Globals::new(false, false).identity());
        assert_eq!(a.identity().len(), 16);
    }

    #[test]
    fn map_layouts_read_as_words() {
        let l = MapLayout {
            map_type: 1,
            key_size: 8,
            value_size: 16,
            max_entries: 4,
        };
        assert_eq!(describe(l), "hash with 8-byte keys and 16-byte values");
        assert_eq!(map_type_name(99), "type 99");
    }
}
