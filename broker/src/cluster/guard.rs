//! Requests the Cluster service never sees: a body that is not the message
//! its method takes (garbage, or a message of another API version), or a
//! method this node does not have. tonic answers those itself (INTERNAL
//! "failed to decode", UNIMPLEMENTED); this wrapper makes each one a log
//! line and a `broker_cluster_rejected_total{reason="malformed"}` increment,
//! like the refusals the service makes.

use std::convert::Infallible;
use std::sync::Arc;

use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;

use super::Node;

#[derive(Clone)]
pub struct Guarded<S> {
    pub inner: S,
    pub node: Arc<Node>,
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Guarded<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Send,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let remote = req.extensions().get::<tonic::transport::server::TcpConnectInfo>().and_then(|i| i.remote_addr());
        let fut = self.inner.call(req);
        let node = self.node.clone();
        Box::pin(async move {
            let resp = fut.await?;
            let h = resp.headers();
            let code = h.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i32>().ok());
            let msg = h.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("");
            let malformed = match code.map(tonic::Code::from) {
                Some(tonic::Code::Unimplemented) => true,
                Some(tonic::Code::Internal) => msg.contains("decode"),
                _ => false,
            };
            if malformed {
                node.metrics.rejected("malformed");
                let msg = percent_decode(msg);
                tracing::warn!(
                    node = %node.settings.node_name,
                    method = %path,
                    from = ?remote,
                    "malformed cluster request refused ({msg}): the sender speaks another version of \
                     broker.v1 or is not a broker node"
                );
            }
            Ok(resp)
        })
    }
}

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
