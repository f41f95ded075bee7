//! QUIC endpoints: TLS configs with pinned peers, and the transport settings doppel needs.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::CertificateDer;

use crate::keys::{fingerprint, parse_fingerprint, Identity};
use crate::verify::{PinnedClientVerifier, PinnedServerVerifier};

/// ALPN protocol id. A peer speaking anything else fails the handshake instead of
/// misreading frames.
pub const ALPN: &[u8] = b"doppel/1";

/// The TLS server name the client asks for. The server certificate is pinned by
/// fingerprint, so the name is not checked; it only has to be syntactically valid.
const SERVER_NAME: &str = "doppel-receiver";

/// How often an idle connection sends a PING, and how long without any packet until the
/// peer is declared dead. Keep-alives well below the idle timeout mean a live but quiet
/// peer never times out, while a dead one (host down, cable cut) is noticed within
/// seconds rather than at the next write.
const KEEP_ALIVE: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Flow-control windows. quinn's defaults (about 1.25 MB per stream) are sized for a
/// 100 Mbit/s, 100 ms path; replication streams are bulk transfers that should fill
/// gigabit links across data centres, so allow several round trips' worth in flight.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
const SEND_WINDOW: u64 = 16 << 20;

/// The largest UDP payload either side accepts and probes for. QUIC starts at 1200
/// bytes and MTU discovery climbs from there as far as the path allows: 1452 on
/// Ethernet, about 9000 with jumbo frames, 64 KiB on loopback. Every datagram costs a
/// header, an AEAD call and a trip through both QUIC stacks, so bulk copies on fat
/// paths take far less CPU per byte (a 1 GiB mirror over loopback: 2.9 s at 1200 bytes,
/// 1.6 s at 64 KiB). quinn's defaults stop at Ethernet's 1500. The value is the most a
/// single IPv6 datagram can carry; IPv4 allows 20 bytes more.
const MAX_DATAGRAM: u16 = 65_487;

/// Which transport settings an endpoint gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuning {
    /// doppel's: wide flow-control windows, keep-alives, datagrams up to 64 KiB, large
    /// socket buffers. What the agent and the receiver use.
    Doppel,
    /// quinn's own defaults on a plain socket (TLS and pinning as always): the
    /// baseline benchmarks compare doppel with.
    QuinnDefaults,
}

impl Tuning {
    /// The connection settings to install, or `None` for quinn's defaults.
    fn transport(self) -> Option<Arc<TransportConfig>> {
        (self == Tuning::Doppel).then(transport_config)
    }

    /// The endpoint settings: with doppel's, peers are told this endpoint takes
    /// datagrams up to [`MAX_DATAGRAM`] (a sender's MTU discovery never climbs past
    /// what the receiving side advertised).
    fn tune_endpoint(self, config: &mut quinn::EndpointConfig) {
        if self == Tuning::Doppel {
            config
                .max_udp_payload_size(MAX_DATAGRAM)
                .expect("MAX_DATAGRAM is within QUIC's 1200..=65527");
        }
    }
}

fn transport_config() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(IDLE_TIMEOUT).expect("10 s is a valid QUIC idle timeout"),
    ));
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(SEND_WINDOW);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_DATAGRAM);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

fn normalise(fps: Vec<String>) -> anyhow::Result<Vec<String>> {
    fps.iter().map(|f| parse_fingerprint(f)).collect()
}

/// Binds a server endpoint on `listen` that only completes handshakes with clients whose
/// certificate fingerprint is in `allowed`. Must be called inside a tokio runtime.
pub fn server_endpoint(
    listen: SocketAddr,
    id: &Identity,
    allowed: Vec<String>,
) -> anyhow::Result<quinn::Endpoint> {
    server_endpoint_tuned(listen, id, allowed, Tuning::Doppel)
}

/// [`server_endpoint`] with the given [`Tuning`].
pub fn server_endpoint_tuned(
    listen: SocketAddr,
    id: &Identity,
    allowed: Vec<String>,
    tuning: Tuning,
) -> anyhow::Result<quinn::Endpoint> {
    let allowed = normalise(allowed).context("invalid fingerprint in the allowed client list")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(crate::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is not supported by the crypto provider")?
        .with_client_cert_verifier(Arc::new(PinnedClientVerifier::new(allowed)))
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .context("cannot use the receiver certificate and key for TLS")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // The session state is per source and lives in the receiver; 0-RTT would let a
    // replayed first flight re-apply records, so leave it off.
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).context("cannot build the QUIC TLS config")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    if let Some(t) = tuning.transport() {
        config.transport_config(t);
    }
    let socket = crate::socket::bind(listen, tuning).with_context(|| {
        format!(
            "cannot listen on UDP {listen}; is another receiver running, or is the address wrong?"
        )
    })?;
    let (reset, cid) = restart_keys(id);
    let mut endpoint = quinn::EndpointConfig::new(Arc::new(reset));
    tuning.tune_endpoint(&mut endpoint);
    endpoint
        .cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid)));
    quinn::Endpoint::new_with_abstract_socket(
        endpoint,
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(|| format!("cannot start the QUIC endpoint on UDP {listen}"))
}

/// The keys stateless-reset tokens are derived from and connection ids are checked
/// with, the same across restarts (derived from the receiver's private key). A receiver
/// that restarted then recognises the connection ids it issued before, answers the
/// agents' packets for connections it no longer has with a reset the agents can verify,
/// and they reconnect at once instead of waiting out the idle timeout.
fn restart_keys(id: &Identity) -> (aws_lc_rs::hmac::Key, u64) {
    use sha2::Digest;
    let derive = |label: &[u8]| {
        let mut h = sha2::Sha256::new();
        h.update(label);
        h.update(id.key.secret_der());
        h.finalize()
    };
    let reset = derive(b"doppel stateless reset key v1\0");
    let cid = derive(b"doppel connection id key v1\0");
    let cid = u64::from_le_bytes(cid[..8].try_into().expect("32-byte digest"));
    (
        aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &reset),
        cid,
    )
}

/// Connects to the receiver at `addr`, presenting `id` and accepting only a server whose
/// certificate fingerprint is `server_fp`.
pub async fn connect(
    id: &Identity,
    addr: SocketAddr,
    server_fp: &str,
) -> anyhow::Result<quinn::Connection> {
    connect_tuned(id, addr, server_fp, Tuning::Doppel).await
}

/// [`connect`] with the given [`Tuning`].
pub async fn connect_tuned(
    id: &Identity,
    addr: SocketAddr,
    server_fp: &str,
    tuning: Tuning,
) -> anyhow::Result<quinn::Connection> {
    Ok(connect_with_endpoint(id, addr, server_fp, tuning).await?.0)
}

/// [`connect_tuned`], also handing back the connection's endpoint: a caller that closes
/// the connection on its way out awaits the endpoint's `wait_idle` to know the close
/// went out (quinn sends it from the endpoint's driver, after `close` returns).
pub async fn connect_with_endpoint(
    id: &Identity,
    addr: SocketAddr,
    server_fp: &str,
    tuning: Tuning,
) -> anyhow::Result<(quinn::Connection, quinn::Endpoint)> {
    let server_fp = parse_fingerprint(server_fp).context("invalid receiver fingerprint")?;
    let verifier = Arc::new(PinnedServerVerifier::new(server_fp));
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is not supported by the crypto provider")?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .context("cannot use the agent certificate and key for TLS")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).context("cannot build the QUIC TLS config")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    if let Some(t) = tuning.transport() {
        config.transport_config(t);
    }

    let bind: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // The connection keeps the endpoint's driver alive; the handle is only needed to
    // wait for a close to go out.
    let socket = crate::socket::bind(bind, tuning)
        .with_context(|| format!("cannot bind a UDP socket on {bind}"))?;
    let mut endpoint_config = quinn::EndpointConfig::default();
    tuning.tune_endpoint(&mut endpoint_config);
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        endpoint_config,
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(|| format!("cannot start a QUIC endpoint on UDP {bind}"))?;
    let connecting = endpoint
        .connect_with(config, addr, SERVER_NAME)
        .with_context(|| format!("cannot start a QUIC connection to {addr}"))?;
    match connecting.await {
        Ok(conn) => Ok((conn, endpoint)),
        Err(e) => match verifier.refusal() {
            Some(why) => Err(anyhow::anyhow!(why))
                .with_context(|| format!("refused to connect to the receiver at {addr}")),
            None => Err(e).with_context(|| format!("cannot connect to the receiver at {addr}")),
        },
    }
}

/// Fingerprint of the peer's leaf certificate, once the handshake has completed.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<String> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().map(|c| fingerprint(c))
}
