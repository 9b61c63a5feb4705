//! The tracking link's routes, open to anyone holding the link: `GET /track/{token}`
//! (the page), `GET /track/{token}/state` (the delivery, as JSON),
//! `GET /track/{token}/events` (its live events) and the page's assets under
//! `/track/assets/`. The page and its assets are built into the binary: no CDN, nothing
//! fetched from elsewhere.
//!
//! The token (`links.rs`) is the only credential: it names one delivery of one tenant,
//! read-only, until it expires. It must not serve anything the token does not name.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};

use super::events;
use crate::body::{Body, full};
use crate::error::{IngestError, Result};
use crate::links::now_secs;
use crate::response::json_bytes;
use crate::state::App;
use crate::status;

const PAGE: &str = include_str!("../track/index.html");
const SCRIPT: &str = include_str!("../track/track.js");
const STYLE: &str = include_str!("../track/track.css");

/// Everything the page loads comes from here; nothing runs inline.
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
     form-action 'none'";

/// What a path under `/track/` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrackPath<'p> {
    /// `/track/assets/{name}`.
    Asset(&'p str),
    /// `/track/{token}`.
    Page(&'p str),
    /// `/track/{token}/state`.
    State(&'p str),
    /// `/track/{token}/events`.
    Events(&'p str),
}

impl<'p> TrackPath<'p> {
    /// `rest`: the path after `/track/`.
    pub(crate) fn of(rest: &'p str) -> Option<Self> {
        if let Some(name) = rest.strip_prefix("assets/") {
            return Some(Self::Asset(name));
        }
        let (token, what) = rest.split_once('/').unwrap_or((rest, ""));
        if token.is_empty() {
            return None;
        }
        match what {
            "" => Some(Self::Page(token)),
            "state" => Some(Self::State(token)),
            "events" => Some(Self::Events(token)),
            _ => None,
        }
    }
}

/// Answers `GET` of `path`.
pub(crate) fn get(
    app: &App,
    req: &Request<Incoming>,
    path: TrackPath<'_>,
) -> Result<Response<Body>> {
    match path {
        TrackPath::Asset("track.js") => Ok(asset(SCRIPT, "text/javascript; charset=utf-8")),
        TrackPath::Asset("track.css") => Ok(asset(STYLE, "text/css; charset=utf-8")),
        TrackPath::Asset(_) => Err(IngestError::NotFound {
            path: req.uri().path().chars().take(256).collect(),
        }),
        // The page is the same for every token; it asks for the delivery itself, so an
        // invalid link still gets a readable page that says so.
        TrackPath::Page(_) => {
            let mut response = asset(PAGE, "text/html; charset=utf-8");
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            Ok(response)
        }
        TrackPath::State(token) => {
            let tracked = links(app)?.verify(token, now_secs())?;
            let state = app
                .status
                .as_ref()
                .and_then(|view| view.get(&tracked.tenant, &tracked.delivery_id))
                .ok_or_else(|| IngestError::UnknownDelivery {
                    delivery_id: tracked.delivery_id.clone(),
                })?;
            let mut response = json_bytes(StatusCode::OK, status::delivery_body(&state));
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            Ok(response)
        }
        TrackPath::Events(token) => {
            let tracked = links(app)?.verify(token, now_secs())?;
            let until = u64::try_from(tracked.expires_at_secs)
                .ok()
                .map(|secs| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs));
            events::delivery_events(app, req, &tracked.tenant, &tracked.delivery_id, until)
        }
    }
}

fn links(app: &App) -> Result<&crate::links::Links> {
    app.links.as_ref().ok_or_else(|| IngestError::NotFound {
        path: "/track/".into(),
    })
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(full(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("public, max-age=300"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_paths() {
        assert_eq!(
            TrackPath::of("assets/track.js"),
            Some(TrackPath::Asset("track.js"))
        );
        assert_eq!(TrackPath::of("abc.def"), Some(TrackPath::Page("abc.def")));
        assert_eq!(TrackPath::of("abc/state"), Some(TrackPath::State("abc")));
        assert_eq!(TrackPath::of("abc/events"), Some(TrackPath::Events("abc")));
        assert_eq!(TrackPath::of("abc/other"), None);
        assert_eq!(TrackPath::of(""), None);
        assert_eq!(TrackPath::of("/state"), None);
    }

    #[test]
    fn the_page_loads_only_its_own_assets() {
        assert!(PAGE.contains("assets/track.js") && PAGE.contains("assets/track.css"));
        for text in [PAGE, SCRIPT, STYLE] {
            // The SVG namespace is a name, not a request.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "no remote URL"
            );
        }
        assert!(!PAGE.contains("<script>"), "no inline script");
    }
}
