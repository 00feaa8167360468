//! The egress gateway: every TCP connection and DNS query a guest makes arrives here (the
//! namespace's rules redirect them), is decided by the VM's [`Egress`] policy, and is either
//! refused or relayed from kilnd's own network namespace. Each decision is a [`Flow`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::netns::Netns;
use crate::policy::{host_addresses, normalize, Admission, Egress};
use crate::rules::{self, GatewayPorts};
use crate::sniff::{sniff, Sniffed, MAX_SNIFF};
use crate::NetError;

/// How many flows each VM keeps for `kiln flows` (oldest dropped first).
pub const FLOWS_PER_VM: usize = 512;
/// Connections one VM may hold open through the gateway at once.
pub const CONNECTIONS_PER_VM: usize = 256;
/// DNS lookups one VM may have in flight at once.
const LOOKUPS_PER_VM: usize = 16;
/// Names one VM's resolution table holds (oldest dropped first).
const NAMES_PER_VM: usize = 4096;
/// VMs whose flows are kept, ended ones included (the one whose last flow is oldest is
/// dropped first), so a kilnd that launches VMs for months keeps bounded memory.
pub const VMS_WITH_FLOWS: usize = 1024;

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Names answered from this table before the host's resolver (the operator's
    /// `--egress-hosts` file, in /etc/hosts format).
    pub hosts: HashMap<String, Vec<IpAddr>>,
    /// How long a connection to a destination may take.
    pub connect_timeout: Duration,
    /// How long the gateway waits for a client's first bytes when it must check a name.
    pub sniff_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            hosts: HashMap::new(),
            connect_timeout: Duration::from_secs(10),
            sniff_timeout: Duration::from_secs(5),
        }
    }
}

/// Reads an /etc/hosts-format table (`ADDRESS NAME [NAME…]`, `#` comments).
pub fn parse_hosts(text: &str) -> Result<HashMap<String, Vec<IpAddr>>, String> {
    let mut out: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let addr = words.next().unwrap_or_default();
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("line {}: {addr:?} is not an IP address", n + 1))?;
        for name in words {
            out.entry(normalize(name)).or_default().push(ip);
        }
    }
    Ok(out)
}

/// One connection or lookup a guest attempted.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Flow {
    /// When it started (seconds since the epoch).
    pub started_at: f64,
    /// `tcp` or `dns`.
    pub protocol: &'static str,
    /// Destination address (for DNS: the first address answered, if any).
    pub destination: Option<IpAddr>,
    /// Destination port (53 for DNS).
    pub port: u16,
    /// The name involved: the TLS SNI or HTTP Host sent, or the name looked up.
    pub name: Option<String>,
    /// Whether it was let through.
    pub allowed: bool,
    /// Why it was refused.
    pub reason: Option<String>,
    /// Bytes the guest sent.
    pub bytes_out: u64,
    /// Bytes the guest received.
    pub bytes_in: u64,
    /// Whether the connection is still open.
    pub open: bool,
    #[serde(skip)]
    id: u64,
}

/// Totals over every VM, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections relayed.
    pub allowed: AtomicU64,
    /// Connections refused.
    pub blocked: AtomicU64,
    /// Lookups answered.
    pub dns_answered: AtomicU64,
    /// Lookups refused (name not allowed).
    pub dns_refused: AtomicU64,
    /// Bytes guests sent through the gateway.
    pub bytes_out: AtomicU64,
    /// Bytes guests received through it.
    pub bytes_in: AtomicU64,
}

/// The egress gateway, shared by every VM of one kilnd.
#[derive(Debug, Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: GatewayConfig,
    counters: Counters,
    flows: Mutex<HashMap<String, VecDeque<Flow>>>,
    next_flow: AtomicU64,
    host: Mutex<(Option<Instant>, Arc<Vec<IpAddr>>)>,
}

impl Gateway {
    /// A gateway with these settings.
    pub fn new(config: GatewayConfig) -> Gateway {
        Gateway {
            inner: Arc::new(Inner {
                config,
                counters: Counters::default(),
                flows: Mutex::new(HashMap::new()),
                next_flow: AtomicU64::new(1),
                host: Mutex::new((None, Arc::new(Vec::new()))),
            }),
        }
    }

    /// Totals for `/metrics`.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// The flows `vm` made, oldest first.
    pub fn flows(&self, vm: &str) -> Vec<Flow> {
        let flows = self.inner.flows.lock().unwrap_or_else(|e| e.into_inner());
        flows
            .get(vm)
            .map(|f| f.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets `vm`'s flows (it ended).
    pub fn forget(&self, vm: &str) {
        let mut flows = self.inner.flows.lock().unwrap_or_else(|e| e.into_inner());
        flows.remove(vm);
    }

    /// Serves `vm`'s namespace with `policy`: binds the gateway's listeners inside it and
    /// (re)writes its rules to redirect there. Serving stops when the attachment drops.
    pub async fn attach(
        &self,
        netns: &Netns,
        vm: &str,
        policy: Egress,
    ) -> Result<Attachment, NetError> {
        if netns.is_host() {
            return Err(NetError::HostNamespace);
        }
        let any = SocketAddr::from((crate::netns::GATEWAY_ADDR, 0));
        let tcp = netns.listen_tcp(any)?;
        let udp = netns.bind_udp(any)?;
        let io = |e| NetError::Namespace {
            doing: "reading a gateway listener's port",
            source: e,
        };
        let ports = GatewayPorts {
            tcp: tcp.local_addr().map_err(io)?.port(),
            dns: udp.local_addr().map_err(io)?.port(),
        };
        let ns = netns_dup(netns)?;
        tokio::task::spawn_blocking(move || rules::apply(&ns, Some(ports)))
            .await
            .map_err(|e| NetError::Tool {
                program: "nft".into(),
                message: format!("the rules task failed: {e}"),
            })??;
        let vm_state = Arc::new(VmState {
            gateway: self.clone(),
            vm: vm.to_string(),
            policy,
            names: Mutex::new(Names::default()),
            connections: Arc::new(Semaphore::new(CONNECTIONS_PER_VM)),
            lookups: Arc::new(Semaphore::new(LOOKUPS_PER_VM)),
        });
        let tasks = vec![
            tokio::spawn(serve_tcp(tcp, vm_state.clone())),
            tokio::spawn(serve_dns(Arc::new(udp), vm_state.clone())),
        ];
        Ok(Attachment { tasks })
    }

    fn host_addresses(&self) -> Arc<Vec<IpAddr>> {
        let mut host = self.inner.host.lock().unwrap_or_else(|e| e.into_inner());
        let stale = host
            .0
            .is_none_or(|at| at.elapsed() > Duration::from_secs(5));
        if stale {
            *host = (Some(Instant::now()), Arc::new(host_addresses()));
        }
        host.1.clone()
    }

    fn record(&self, vm: &str, mut flow: Flow) -> u64 {
        let id = self.inner.next_flow.fetch_add(1, Ordering::Relaxed);
        flow.id = id;
        let mut flows = self.inner.flows.lock().unwrap_or_else(|e| e.into_inner());
        if !flows.contains_key(vm) && flows.len() >= VMS_WITH_FLOWS {
            let stalest = flows
                .iter()
                .min_by_key(|(_, l)| l.back().map_or(0, |f| f.id))
                .map(|(k, _)| k.clone());
            if let Some(k) = stalest {
                flows.remove(&k);
            }
        }
        let list = flows.entry(vm.to_string()).or_default();
        if list.len() >= FLOWS_PER_VM {
            list.pop_front();
        }
        list.push_back(flow);
        id
    }

    fn finish(&self, vm: &str, id: u64, out: u64, inn: u64) {
        let c = &self.inner.counters;
        c.bytes_out.fetch_add(out, Ordering::Relaxed);
        c.bytes_in.fetch_add(inn, Ordering::Relaxed);
        let mut flows = self.inner.flows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = flows
            .get_mut(vm)
            .and_then(|l| l.iter_mut().rev().find(|f| f.id == id))
        {
            f.bytes_out = out;
            f.bytes_in = inn;
            f.open = false;
        }
    }

    async fn resolve(&self, name: &str) -> Vec<IpAddr> {
        if let Some(ips) = self.inner.config.hosts.get(name) {
            return ips.clone();
        }
        let lookup = tokio::net::lookup_host((name.to_string(), 0));
        match tokio::time::timeout(Duration::from_secs(5), lookup).await {
            Ok(Ok(addrs)) => {
                let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                ips.dedup();
                ips
            }
            _ => Vec::new(),
        }
    }
}

fn netns_dup(netns: &Netns) -> Result<Netns, NetError> {
    netns.try_clone()
}

/// Serving one VM; dropping it stops the gateway's listeners in the VM's namespace.
#[derive(Debug)]
pub struct Attachment {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A VM's egress as its VMM needs it: which gateway, which VM, which policy.
#[derive(Debug, Clone)]
pub struct VmEgress {
    /// The gateway.
    pub gateway: Gateway,
    /// The VM's id (its flows are kept under it).
    pub vm: String,
    /// What it may reach.
    pub policy: Egress,
}

impl VmEgress {
    /// Attaches the gateway to the VM's namespace.
    pub async fn attach(&self, netns: &Netns) -> Result<Attachment, NetError> {
        self.gateway
            .attach(netns, &self.vm, self.policy.clone())
            .await
    }
}

#[derive(Debug, Default)]
struct Names {
    by_ip: HashMap<IpAddr, Vec<String>>,
    order: VecDeque<(IpAddr, String)>,
}

impl Names {
    fn add(&mut self, ip: IpAddr, name: &str) {
        let list = self.by_ip.entry(ip).or_default();
        if list.iter().any(|n| n == name) {
            return;
        }
        list.push(name.to_string());
        self.order.push_back((ip, name.to_string()));
        while self.order.len() > NAMES_PER_VM {
            if let Some((old_ip, old)) = self.order.pop_front() {
                if let Some(l) = self.by_ip.get_mut(&old_ip) {
                    l.retain(|n| n != &old);
                }
            }
        }
    }
}

#[derive(Debug)]
struct VmState {
    gateway: Gateway,
    vm: String,
    policy: Egress,
    names: Mutex<Names>,
    connections: Arc<Semaphore>,
    lookups: Arc<Semaphore>,
}

impl VmState {
    fn names_for(&self, ip: IpAddr) -> Vec<String> {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names.by_ip.get(&ip).cloned().unwrap_or_default()
    }

    fn blocked(
        &self,
        protocol: &'static str,
        dest: Option<IpAddr>,
        port: u16,
        name: Option<String>,
        reason: String,
    ) {
        self.gateway
            .inner
            .counters
            .blocked
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(vm = %self.vm, ?dest, port, ?name, %reason, "egress refused");
        self.gateway.record(
            &self.vm,
            flow(protocol, dest, port, name, false, Some(reason)),
        );
    }
}

fn flow(
    protocol: &'static str,
    destination: Option<IpAddr>,
    port: u16,
    name: Option<String>,
    allowed: bool,
    reason: Option<String>,
) -> Flow {
    Flow {
        started_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default(),
        protocol,
        destination,
        port,
        name,
        allowed,
        reason,
        bytes_out: 0,
        bytes_in: 0,
        open: allowed && protocol == "tcp",
        id: 0,
    }
}

async fn serve_tcp(listener: tokio::net::TcpListener, vm: Arc<VmState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = vm.connections.clone().try_acquire_owned() else {
            vm.blocked(
                "tcp",
                None,
                0,
                None,
                format!("more than {CONNECTIONS_PER_VM} connections open"),
            );
            continue;
        };
        let vm = vm.clone();
        tokio::spawn(async move {
            relay(stream, &vm).await;
            drop(permit);
        });
    }
}

/// The destination the guest asked for, before the namespace's rules redirected it.
fn original_destination(stream: &TcpStream) -> Option<SocketAddrV4> {
    let mut addr: libc::sockaddr_in = unsafe_zeroed_sockaddr();
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: addr and len are valid for writes of sockaddr_in's size; the descriptor is
    // the stream's, open for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    Some(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

fn unsafe_zeroed_sockaddr() -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: 0,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    }
}

async fn relay(mut client: TcpStream, vm: &VmState) {
    let Some(dest) = original_destination(&client) else {
        vm.blocked("tcp", None, 0, None, "no original destination".into());
        return;
    };
    let ip = IpAddr::V4(*dest.ip());
    let port = dest.port();
    let host = vm.gateway.host_addresses();
    let names = vm.names_for(ip);
    let admission = vm.policy.admit(ip, port, &names, &host);
    let config = &vm.gateway.inner.config;
    let mut first = Vec::new();
    let mut seen_name = None;
    match &admission {
        Admission::Deny(reason) => {
            vm.blocked("tcp", Some(ip), port, None, reason.clone());
            reset(&client);
            return;
        }
        Admission::Named(allowed) => {
            let deadline = tokio::time::Instant::now() + config.sniff_timeout;
            let verdict = loop {
                match sniff(&first) {
                    Sniffed::Incomplete if first.len() < MAX_SNIFF => {}
                    other => break other,
                }
                let mut chunk = [0u8; 4096];
                match tokio::time::timeout_at(deadline, client.read(&mut chunk)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => first.extend_from_slice(&chunk[..n]),
                    Err(_) => break Sniffed::Other,
                }
            };
            let claimed = match verdict {
                Sniffed::Tls(n) | Sniffed::Http(n) => n,
                _ => None,
            };
            if let Some(name) = &claimed {
                if !allowed.iter().any(|a| a == name) {
                    reset(&client);
                    vm.blocked(
                        "tcp",
                        Some(ip),
                        port,
                        Some(name.clone()),
                        format!("{name} is not a name this VM resolved to {ip}"),
                    );
                    return;
                }
            }
            seen_name = claimed.or_else(|| allowed.first().cloned());
        }
        Admission::Open => {}
    }
    let upstream = match tokio::time::timeout(
        config.connect_timeout,
        TcpStream::connect(SocketAddr::from(dest)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            vm.blocked("tcp", Some(ip), port, seen_name, format!("connecting: {e}"));
            return;
        }
        Err(_) => {
            vm.blocked(
                "tcp",
                Some(ip),
                port,
                seen_name,
                "connecting timed out".into(),
            );
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let mut upstream = upstream;
    if matches!(admission, Admission::Open) {
        // Read what the client sends first (if it speaks first) to name the flow.
        let mut chunk = vec![0u8; 4096];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), client.read(&mut chunk)).await
        {
            first.extend_from_slice(&chunk[..n]);
            if let Sniffed::Tls(n) | Sniffed::Http(n) = sniff(&first) {
                seen_name = n;
            }
        }
    }
    vm.gateway
        .inner
        .counters
        .allowed
        .fetch_add(1, Ordering::Relaxed);
    let id = vm
        .gateway
        .record(&vm.vm, flow("tcp", Some(ip), port, seen_name, true, None));
    let sent = first.len() as u64;
    if !first.is_empty() && upstream.write_all(&first).await.is_err() {
        vm.gateway.finish(&vm.vm, id, sent, 0);
        return;
    }
    let (out, inn) = tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .unwrap_or((0, 0));
    vm.gateway.finish(&vm.vm, id, sent + out, inn);
}

/// Closes with a reset, so the guest sees its connection refused rather than ended.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

async fn serve_dns(socket: Arc<UdpSocket>, vm: Arc<VmState>) {
    let mut buf = vec![0u8; 1500];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let Ok(permit) = vm.lookups.clone().try_acquire_owned() else {
            continue;
        };
        let (socket, vm) = (socket.clone(), vm.clone());
        tokio::spawn(async move {
            let answer = answer(&query, &vm).await;
            if let Ok(bytes) = answer.to_vec() {
                let _ = socket.send_to(&bytes, peer).await;
            }
            drop(permit);
        });
    }
}

async fn answer(query: &Message, vm: &VmState) -> Message {
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true);
    let Some(q) = query.queries().first() else {
        reply.set_response_code(ResponseCode::FormErr);
        return reply;
    };
    reply.add_query(q.clone());
    let name = normalize(&q.name().to_utf8());
    let c = &vm.gateway.inner.counters;
    if !vm.policy.may_resolve(&name) {
        c.dns_refused.fetch_add(1, Ordering::Relaxed);
        vm.blocked(
            "dns",
            None,
            53,
            Some(name.clone()),
            format!("{name} is not an allowed name"),
        );
        reply.set_response_code(ResponseCode::NXDomain);
        return reply;
    }
    let host = vm.gateway.host_addresses();
    let ips: Vec<IpAddr> = vm
        .gateway
        .resolve(&name)
        .await
        .into_iter()
        .filter(|ip| vm.policy.may_answer(&name, *ip, &host))
        .collect();
    if ips.is_empty() {
        c.dns_refused.fetch_add(1, Ordering::Relaxed);
        vm.blocked(
            "dns",
            None,
            53,
            Some(name.clone()),
            format!("{name} has no address this VM may reach"),
        );
        reply.set_response_code(ResponseCode::NXDomain);
        return reply;
    }
    c.dns_answered.fetch_add(1, Ordering::Relaxed);
    {
        let mut names = vm.names.lock().unwrap_or_else(|e| e.into_inner());
        for ip in &ips {
            names.add(*ip, &name);
        }
    }
    if q.query_type() == RecordType::A {
        for ip in &ips {
            if let IpAddr::V4(v4) = ip {
                reply.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A(*v4))));
            }
        }
    }
    let mut f = flow("dns", ips.first().copied(), 53, Some(name), true, None);
    f.open = false;
    vm.gateway.record(&vm.vm, f);
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_hosts_when_comments_and_aliases_then_each_name_maps() {
        let t =
            parse_hosts("# test\n10.99.0.1 svc-a.test  Alias.Test\n\n10.99.0.2 svc-b.test # b\n")
                .expect("parse");
        assert_eq!(
            t["svc-a.test"],
            vec!["10.99.0.1".parse::<IpAddr>().expect("ip")]
        );
        assert!(t.contains_key("alias.test"));
        assert!(parse_hosts("nonsense name").is_err());
    }

    #[test]
    fn record_when_more_vms_than_kept_then_the_stalest_vm_is_dropped_and_each_list_is_capped() {
        let gateway = Gateway::new(GatewayConfig::default());
        let blocked = || flow("tcp", None, 80, None, false, Some("test".into()));
        for _ in 0..FLOWS_PER_VM + 3 {
            gateway.record("busy", blocked());
        }
        for n in 0..VMS_WITH_FLOWS - 1 {
            gateway.record(&format!("vm-{n}"), blocked());
        }
        gateway.record("busy", blocked());
        gateway.record("late", blocked());

        let kept = gateway.inner.flows.lock().expect("flows").len();
        assert_eq!(kept, VMS_WITH_FLOWS);
        assert!(gateway.flows("vm-0").is_empty(), "the stalest VM was kept");
        assert_eq!(gateway.flows("busy").len(), FLOWS_PER_VM);
        assert_eq!(gateway.flows("vm-1").len(), 1);
    }
}
