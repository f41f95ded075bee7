//! The opt-in Prometheus endpoint of both daemons: `GET /metrics` on the address in
//! `[metrics] listen`, answered in the OpenMetrics text format.
//!
//! Each scrape builds a fresh exposition from a snapshot of the daemon's state
//! ([`Exposition`]): a gauge or counter is never stale, and a set or source that went
//! away leaves no series behind. Histograms are the exception: they are observed as
//! things happen, so they live in the daemon ([`Histograms`]) and are added per scrape.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{Context, Result};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tracing::{info, warn};

/// `[metrics]` in either daemon's config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to serve `/metrics`, e.g. "127.0.0.1:9750". Absent: no endpoint.
    pub listen: Option<SocketAddr>,
}

/// Label pairs of one series.
pub type Labels = Vec<(String, String)>;

/// Histograms by labels, kept by the daemon and observed as things happen.
pub type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Seconds-scale histograms: 1 ms to about 33 s, doubling.
pub fn latency_histograms() -> Histograms {
    fn make() -> Histogram {
        Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.001, 2.0, 16,
        ))
    }
    Family::new_with_constructor(make as fn() -> Histogram)
}

/// Builds labels from `(key, value)` pairs.
pub fn labels<const N: usize>(pairs: [(&str, &str); N]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One scrape's worth of metrics, all named `doppel_*`.
pub struct Exposition {
    registry: Registry,
}

impl Default for Exposition {
    fn default() -> Self {
        Exposition {
            registry: Registry::with_prefix("doppel"),
        }
    }
}

impl Exposition {
    /// A counter (exposed as `doppel_<name>_total`) with one sample per label set.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        let family = Family::<Labels, Counter>::default();
        for (l, v) in samples {
            family.get_or_create(&l).inc_by(v);
        }
        self.registry.register(name, help, family);
    }

    /// A gauge with one sample per label set.
    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (l, v) in samples {
            family.get_or_create(&l).set(v);
        }
        self.registry.register(name, help, family);
    }

    pub fn histograms(&mut self, name: &str, help: &str, family: &Histograms) {
        self.registry.register(name, help, family.clone());
    }

    /// The OpenMetrics text of it all.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the endpoint: done at start, so that a daemon whose metrics port is taken
/// refuses to start rather than run unobserved.
/// Must be called inside a tokio runtime.
pub fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).with_context(|| {
        format!("cannot listen on {addr} for metrics: is another process using it? change `[metrics] listen`")
    })?;
    l.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(l)?)
}

/// Serves `GET /metrics` until the process ends; `render` makes the body.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics endpoint ready: GET /metrics");
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: keep serving once it passes.
                warn!(error = %e, "metrics endpoint cannot accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(&req, &*render)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            // A slow or broken scraper only ever costs its own connection.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(io, service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
        });
    }
}

fn answer(
    req: &Request<hyper::body::Incoming>,
    render: &dyn Fn() -> String,
) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(text.as_bytes())))
            .expect("a valid response")
    };
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "doppel serves only /metrics\n");
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET /metrics\n");
    }
    Response::builder()
        .header("content-type", CONTENT_TYPE)
        .body(Full::new(Bytes::from(render())))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_openmetrics_text_with_every_series() {
        let mut e = Exposition::default();
        e.counter(
            "sent_bytes",
            "File data sent.",
            [(labels([("set", "a"), ("target", "t")]), 42)],
        );
        e.gauge("lag_seconds", "Lag.", [(labels([("set", "a")]), 1.5)]);
        let h = latency_histograms();
        h.get_or_create(&labels([("set", "a")])).observe(0.003);
        e.histograms("ack_latency_seconds", "Latency.", &h);
        let text = e.render();
        assert!(text.contains("# TYPE doppel_sent_bytes counter"), "{text}");
        assert!(
            text.contains(r#"doppel_sent_bytes_total{set="a",target="t"} 42"#),
            "{text}"
        );
        assert!(
            text.contains(r#"doppel_lag_seconds{set="a"} 1.5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"doppel_ack_latency_seconds_count{set="a"} 1"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn serves_metrics_and_nothing_else() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            Arc::new(|| "doppel_up 1\n# EOF\n".to_string()),
        ));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            for _ in 0..100 {
                if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                    let req =
                        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                    s.write_all(req.as_bytes()).await.unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).await.unwrap();
                    return out;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            panic!("metrics endpoint never came up");
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("application/openmetrics-text"), "{ok}");
        assert!(ok.ends_with("doppel_up 1\n# EOF\n"), "{ok}");
        let missing = get("/").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    }
}
