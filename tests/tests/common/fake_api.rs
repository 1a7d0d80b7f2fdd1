//! A FAKE Kubernetes API server for the tests that watch pods (`k8s_watch.rs`, `repair_e2e.rs`
//! include this file).

// Each including test uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// A FAKE Kubernetes API server, for tests only: it is not Kubernetes and implements only what
/// a pod list+watch needs, on 127.0.0.1 over plain HTTP/1.1 without auth:
///
/// - `GET /api/v1/pods?fieldSelector=spec.nodeName%3DX…` answers a PodList of the pods on
///   node X with the current `resourceVersion` (no paging: every pod fits one page);
/// - the same with `watch=true&resourceVersion=N` answers a chunked stream of watch events
///   (`{"type":"ADDED"|"MODIFIED"|"DELETED","object":Pod}`, one JSON document a line): those
///   after N, then each new one as the test makes it;
/// - `PATCH /api/v1/namespaces/NS/pods/NAME` (a JSON merge patch) changes the pod (a MODIFIED
///   event) and answers it; `DELETE` of the same path (DeleteOptions, `preconditions.uid`
///   honoured: 409 on another uid) removes it (a DELETED event); both are kept in
///   [`FakeApiServer::writes`]; a pod it does not hold is a 404;
/// - anything else is a 404 `Status`.
///
/// The test changes the pods through [`FakeApiServer::add`], [`FakeApiServer::modify`] and
/// [`FakeApiServer::delete`], each one a new resourceVersion and event, and reads back
/// the request targets it was sent ([`FakeApiServer::requests`]). A lagging watch is made with
/// [`FakeApiServer::pause`] (events are held until [`FakeApiServer::resume`]) and a delayed
/// DELETE with [`FakeApiServer::delete_delayed`] + [`FakeApiServer::deliver_late`].
pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
    /// (resourceVersion, watch epoch): open watches follow the first and end when the second
    /// changes.
    tick: watch::Sender<(u64, u64)>,
    _stop: oneshot::Sender<()>,
}

#[derive(Default)]
struct FakeState {
    rv: u64,
    epoch: u64,
    pods: BTreeMap<(String, String), Value>,
    /// (resourceVersion, event type, object), oldest first.
    events: Vec<(u64, &'static str, Value)>,
    requests: Vec<String>,
    /// The writes (PATCH, DELETE) it was sent: (method, target, body).
    writes: Vec<(String, String, Value)>,
    /// Answer the next this-many list requests with a 500.
    fail_lists: usize,
    /// Answer the next watch with a 410 Expired `ERROR` event (the watcher must relist).
    expire_next_watch: bool,
    open_watches: usize,
    /// While paused, watches send no event after this resourceVersion (a lagging watch).
    paused_at: Option<u64>,
}

impl FakeState {
    /// The last resourceVersion the watches may send.
    fn visible(&self) -> u64 {
        self.paused_at.unwrap_or(self.rv)
    }
}

impl FakeApiServer {
    pub fn start() -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("binding the fake API server on loopback");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(FakeState::default()));
        let (tick, _) = watch::channel((0, 0));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let (st, tk) = (state.clone(), tick.clone());
        std::thread::spawn(move || {
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        conn = listener.accept() => {
                            let Ok((conn, _)) = conn else { continue };
                            tokio::spawn(serve(conn, st.clone(), tk.subscribe(), tk.clone()));
                        }
                        _ = &mut stopped => break,
                    }
                }
            })
        });
        Self {
            addr,
            state,
            tick,
            _stop: stop,
        }
    }

    /// A kube client configuration pointing at this fake (plain HTTP, no credentials).
    pub fn kube_config(&self) -> kube::Config {
        kube::Config::new(format!("http://{}", self.addr).parse().unwrap())
    }

    /// A kubeconfig file `dir/config` pointing at this fake (for a daemon's `--kubeconfig`).
    pub fn write_kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let kubeconfig = dir.join("config");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
                 clusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nobody\n\
                 users:\n- name: nobody\n  user: {{}}\n",
                self.addr
            ),
        )
        .unwrap();
        kubeconfig
    }

    fn record(&self, kind: &'static str, mut pod: Value, keep: bool) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&pod);
        if keep {
            s.pods.insert(key, pod.clone());
        } else {
            s.pods.remove(&key);
        }
        s.events.push((rv, kind, pod));
        let now = (s.visible(), s.epoch);
        drop(s);
        self.tick.send_replace(now);
    }

    pub fn add(&self, pod: Value) {
        self.record("ADDED", pod, true);
    }

    pub fn modify(&self, pod: Value) {
        self.record("MODIFIED", pod, true);
    }

    pub fn delete(&self, namespace: &str, name: &str) {
        let pod = self.state.lock().unwrap().pods[&(namespace.into(), name.into())].clone();
        self.record("DELETED", pod, false);
    }

    /// Holds every later event back from the watches until [`Self::resume`]: the watch lags.
    pub fn pause(&self) {
        let mut s = self.state.lock().unwrap();
        s.paused_at = Some(s.rv);
    }

    /// Sends the held events.
    pub fn resume(&self) {
        let mut s = self.state.lock().unwrap();
        s.paused_at = None;
        let now = (s.rv, s.epoch);
        drop(s);
        self.tick.send_replace(now);
    }

    /// Deletes a pod whose DELETED event comes only with [`Self::deliver_late`]: later than
    /// what happens meanwhile (a same-name pod added with a new uid). Returns the pod.
    pub fn delete_delayed(&self, namespace: &str, name: &str) -> Value {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        s.pods.remove(&(namespace.into(), name.into())).unwrap()
    }

    /// An event for `pod` now, leaving the pods (the list's truth) as they are.
    pub fn deliver_late(&self, kind: &'static str, mut pod: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.events.push((rv, kind, pod));
        let now = (s.visible(), s.epoch);
        drop(s);
        self.tick.send_replace(now);
    }

    /// Removes a pod without an event, as if the watcher had missed it (only a relist sees it).
    pub fn delete_silently(&self, namespace: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        s.pods.remove(&(namespace.into(), name.into()));
    }

    /// Adds a pod without an event, as if the watcher had missed it (only a relist sees it).
    pub fn add_silently(&self, mut pod: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        pod["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        s.pods.insert(key_of(&pod), pod);
    }

    /// Ends every open watch; with `expire`, the next watch gets a 410 Expired.
    pub fn end_watches(&self, expire: bool) {
        let mut s = self.state.lock().unwrap();
        s.epoch += 1;
        s.expire_next_watch = expire;
        let now = (s.visible(), s.epoch);
        drop(s);
        self.tick.send_replace(now);
    }

    pub fn fail_next_lists(&self, n: usize) {
        self.state.lock().unwrap().fail_lists = n;
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The PATCH and DELETE requests it was sent, oldest first: (method, target, body).
    pub fn writes(&self) -> Vec<(String, String, Value)> {
        self.state.lock().unwrap().writes.clone()
    }

    /// A pod as the fake holds it now.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Value> {
        let s = self.state.lock().unwrap();
        s.pods.get(&(namespace.into(), name.into())).cloned()
    }

    pub fn open_watches(&self) -> usize {
        self.state.lock().unwrap().open_watches
    }
}

fn key_of(pod: &Value) -> (String, String) {
    let md = &pod["metadata"];
    (
        md["namespace"].as_str().unwrap().to_string(),
        md["name"].as_str().unwrap().to_string(),
    )
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).expect("bad percent escape"));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// A request target's path and decoded query parameters.
pub fn parse_target(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    (path.to_string(), params)
}

/// The node a `spec.nodeName=X` field selector names; `Err` for a selector the fake does not
/// implement.
fn node_selector(params: &BTreeMap<String, String>) -> Result<Option<String>, String> {
    match params.get("fieldSelector").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(sel) => match sel.strip_prefix("spec.nodeName=") {
            Some(node) if !node.contains(',') => Ok(Some(node.to_string())),
            _ => Err(format!("the fake serves no field selector {sel:?}")),
        },
    }
}

fn on_node(pod: &Value, node: &Option<String>) -> bool {
    node.as_deref()
        .is_none_or(|n| pod["spec"]["nodeName"].as_str() == Some(n))
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

async fn respond(conn: &mut TcpStream, code: u16, body: &Value) {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.shutdown().await;
}

async fn serve(
    mut conn: TcpStream,
    state: Arc<Mutex<FakeState>>,
    tick: watch::Receiver<(u64, u64)>,
    sender: watch::Sender<(u64, u64)>,
) {
    // One request a connection (every answer says Connection: close); a body as long as its
    // Content-Length says.
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
        if data.len() > 64 * 1024 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&data[..end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while data.len() < end + length {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
    let body: Value = serde_json::from_slice(&data[end..end + length]).unwrap_or(Value::Null);
    let mut line = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
    state.lock().unwrap().requests.push(target.to_string());
    let (path, params) = parse_target(target);
    if method == "PATCH" || method == "DELETE" {
        return write_pod(&mut conn, &state, &sender, method, target, &path, body).await;
    }
    if method != "GET" || path != "/api/v1/pods" {
        let msg = format!("the fake serves no {method} {path}");
        return respond(&mut conn, 404, &status(404, "NotFound", &msg)).await;
    }
    let node = match node_selector(&params) {
        Ok(node) => node,
        Err(msg) => return respond(&mut conn, 400, &status(400, "BadRequest", &msg)).await,
    };
    if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from = params
            .get("resourceVersion")
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(0);
        return watch_pods(conn, state, tick, node, from).await;
    }
    let list = {
        let mut s = state.lock().unwrap();
        if s.fail_lists > 0 {
            s.fail_lists -= 1;
            None
        } else {
            let items: Vec<Value> = s
                .pods
                .values()
                .filter(|p| on_node(p, &node))
                .cloned()
                .collect();
            Some(json!({"apiVersion": "v1", "kind": "PodList",
                        "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}))
        }
    };
    match list {
        Some(list) => respond(&mut conn, 200, &list).await,
        None => {
            let st = status(500, "InternalError", "the fake fails this list on purpose");
            respond(&mut conn, 500, &st).await
        }
    }
}

async fn watch_pods(
    conn: TcpStream,
    state: Arc<Mutex<FakeState>>,
    mut tick: watch::Receiver<(u64, u64)>,
    node: Option<String>,
    mut from: u64,
) {
    let (mut rd, mut wr) = conn.into_split();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if wr.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let (expire, epoch) = {
        let mut s = state.lock().unwrap();
        s.open_watches += 1;
        (std::mem::take(&mut s.expire_next_watch), s.epoch)
    };
    let mut closed = [0u8; 1];
    'stream: loop {
        // `upto`: the resourceVersion these lines cover, read under the same lock, so an event
        // added while they are written is sent on the next pass, never skipped.
        let (lines, upto): (Vec<String>, u64) = if expire {
            let st = status(410, "Expired", "too old resource version");
            (
                vec![json!({"type": "ERROR", "object": st}).to_string()],
                from,
            )
        } else {
            let s = state.lock().unwrap();
            let upto = s.visible();
            let lines = s
                .events
                .iter()
                .filter(|(rv, _, pod)| *rv > from && *rv <= upto && on_node(pod, &node))
                .map(|(_, kind, pod)| json!({"type": kind, "object": pod}).to_string())
                .collect();
            (lines, upto)
        };
        for line in lines {
            let chunk = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
            if wr.write_all(chunk.as_bytes()).await.is_err() {
                break 'stream;
            }
        }
        if expire {
            break;
        }
        from = from.max(upto);
        if tick.borrow_and_update().0 > from {
            continue;
        }
        tokio::select! {
            changed = tick.changed() => {
                if changed.is_err() || tick.borrow().1 != epoch {
                    break;
                }
            }
            // The client went away (or sent something, which a watch never does).
            _ = rd.read(&mut closed) => break,
        }
    }
    let _ = wr.write_all(b"0\r\n\r\n").await;
    let _ = wr.shutdown().await;
    state.lock().unwrap().open_watches -= 1;
}

/// RFC 7386 JSON merge patch of `patch` into `target`.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// PATCH (merge patch) or DELETE of `/api/v1/namespaces/NS/pods/NAME`.
async fn write_pod(
    conn: &mut TcpStream,
    state: &Arc<Mutex<FakeState>>,
    tick: &watch::Sender<(u64, u64)>,
    method: &str,
    target: &str,
    path: &str,
    body: Value,
) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["api", "v1", "namespaces", ns, "pods", name] = parts[..] else {
        let msg = format!("the fake serves no {method} {path}");
        return respond(conn, 404, &status(404, "NotFound", &msg)).await;
    };
    let answer = {
        let mut s = state.lock().unwrap();
        s.writes
            .push((method.to_string(), target.to_string(), body.clone()));
        let key = (ns.to_string(), name.to_string());
        match s.pods.get(&key).cloned() {
            None => Err((404, "NotFound", format!("pods {name:?} not found"))),
            Some(pod) => {
                let want_uid = body["preconditions"]["uid"].as_str();
                if method == "DELETE"
                    && want_uid.is_some_and(|u| Some(u) != pod["metadata"]["uid"].as_str())
                {
                    Err((
                        409,
                        "Conflict",
                        "Precondition failed: UID in precondition".to_string(),
                    ))
                } else {
                    let mut pod = pod;
                    if method == "PATCH" {
                        merge(&mut pod, &body);
                    }
                    s.rv += 1;
                    let rv = s.rv;
                    pod["metadata"]["resourceVersion"] = json!(rv.to_string());
                    let kind = if method == "PATCH" {
                        s.pods.insert(key, pod.clone());
                        "MODIFIED"
                    } else {
                        s.pods.remove(&key);
                        "DELETED"
                    };
                    s.events.push((rv, kind, pod.clone()));
                    Ok((pod, (s.visible(), s.epoch)))
                }
            }
        }
    };
    match answer {
        Ok((pod, now)) => {
            tick.send_replace(now);
            respond(conn, 200, &pod).await
        }
        Err((code, reason, msg)) => respond(conn, code, &status(code, reason, &msg)).await,
    }
}
