//! Key extractors for [`RateLimitLayer::keyed`](super::RateLimitLayer::keyed).
//!
//! - [`Header`]: the value of a header such as `x-api-key`. A request without it (or with it
//!   empty, not visible ASCII, or sent more than once) has no key: it never shares one limit
//!   with other such requests, but is refused or admitted as
//!   [`KeyedConfig::when_key_missing`](super::KeyedConfig::when_key_missing) says, counted
//!   and warned about once.
//! - [`ClientIp`]: the client's address, safe behind proxies: the peer address, or, **only
//!   when the peer is a trusted proxy**, the rightmost address of `X-Forwarded-For` (or
//!   `Forwarded`) that is not a trusted proxy. The leftmost entry of those headers is whatever
//!   the client wrote, so trusting it would let any client pick its own key. IPv6 clients are
//!   keyed by their /64 by default (one subscriber holds a whole /64).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::{Extensions, Request};

use super::KeyFn;

/// Keys requests by the value of one header.
///
/// A request whose header is absent, empty (or only blanks), not visible ASCII, or sent more
/// than once (which value would be its key?) has no key: such requests never share one
/// limit. A header sent more than once or not visible ASCII is refused whatever the policy
/// (see [`KeyFn::key_is_malformed`]); for one absent or blank, the layer's
/// [`MissingKey`](super::MissingKey) policy decides (refuse, by default),
/// counts them ([`RateLimitHandle::missing_keys`](super::RateLimitHandle::missing_keys)) and
/// warns once. Behind a per-address limit, where requests without the header are anonymous
/// clients that the address limit already bounds, admit them:
///
/// ```
/// use tower_bulwark::rate_limit::{key, KeyedConfig, MissingKey};
/// use tower_bulwark::{Quota, RateLimitLayer};
///
/// let strict = RateLimitLayer::keyed(Quota::per_second(5)?, key::Header::new("x-api-key"));
/// let behind_an_address_limit = RateLimitLayer::keyed(
///     KeyedConfig::new(Quota::per_second(5)?).when_key_missing(MissingKey::Admit),
///     key::Header::new("x-api-key"),
/// );
/// # let _ = (strict, behind_an_address_limit);
/// # Ok::<(), tower_bulwark::rate_limit::QuotaError>(())
/// ```
///
/// The key is the header's [`HeaderValue`] (for
/// [`RateLimitHandle::remaining_for`](super::RateLimitHandle::remaining_for)).
#[derive(Clone, Debug)]
pub struct Header {
    name: HeaderName,
}

impl Header {
    /// Keys by the header `name`.
    ///
    /// # Panics
    ///
    /// If `name` is not a valid header name; use [`Header::from_name`] with a checked
    /// `HeaderName` to avoid that.
    pub fn new(name: &'static str) -> Self {
        Header {
            name: HeaderName::from_static(name),
        }
    }

    /// Keys by the header `name`.
    pub fn from_name(name: HeaderName) -> Self {
        Header { name }
    }

    /// The key of a request: its one value of the header, when it is non-blank visible ASCII.
    pub fn value<'a, B>(&self, req: &'a Request<B>) -> Option<&'a HeaderValue> {
        let mut values = req.headers().get_all(&self.name).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        let text = value.to_str().ok()?;
        (!text.trim_matches([' ', '\t']).is_empty()).then_some(value)
    }
}

impl<B> KeyFn<Request<B>> for Header {
    type Key = HeaderValue;

    #[inline]
    fn key(&self, req: &Request<B>) -> Option<HeaderValue> {
        self.value(req).cloned()
    }

    fn key_is_malformed(&self, req: &Request<B>) -> bool {
        // Sent, but not usable: more than once, or not visible ASCII. (One blank value is no
        // key at all: an anonymous request.)
        let mut values = req.headers().get_all(&self.name).iter();
        match (values.next(), values.next()) {
            (None, _) => false,
            (Some(_), Some(_)) => true,
            (Some(v), None) => v.to_str().is_err(),
        }
    }
}

/// An IP network such as `10.0.0.0/8` or `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// A network that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidNetwork(String);

impl fmt::Display for InvalidNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid IP network {:?}: expected ADDR or ADDR/PREFIX",
            self.0
        )
    }
}

impl std::error::Error for InvalidNetwork {}

impl std::str::FromStr for IpNet {
    type Err = InvalidNetwork;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidNetwork(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| err())?,
            None => max,
        };
        if prefix > max {
            return Err(err());
        }
        // An IPv4-mapped network (`::ffff:10.0.0.0/104`) is the IPv4 network it maps, since
        // an address is matched in its IPv4 form.
        if let IpAddr::V6(v6) = addr {
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), prefix >= 96) {
                return Ok(IpNet {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                });
            }
        }
        Ok(IpNet { addr, prefix })
    }
}

impl IpNet {
    /// Whether `ip` is in this network. IPv4-mapped IPv6 addresses count as IPv4, and a
    /// network written in IPv4-mapped form (`::ffff:10.0.0.0/104`) is the IPv4 network it maps
    /// (`10.0.0.0/8`).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), ip) => {
                // An IPv6 network shorter than /96 may hold IPv4-mapped addresses
                // (`::ffff:0:0/80`): an IPv4 address is matched in its mapped form.
                let ip = match ip {
                    IpAddr::V6(ip) => ip,
                    IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                };
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }
}

/// An IPv6 key prefix outside `1..=128` (see [`ClientIp::ipv6_prefix`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidPrefix(u8);

impl fmt::Display for InvalidPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            f.write_str(
                "IPv6 key prefix 0 would put every IPv6 client under one limit: expected 1..=128",
            )
        } else {
            write!(
                f,
                "IPv6 key prefix {} is longer than an address: expected 1..=128",
                self.0
            )
        }
    }
}

impl std::error::Error for InvalidPrefix {}

/// Which header trusted proxies write the client's address to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (the default).
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

/// The IPv6 prefix [`ClientIp::new`] keys by.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// Reads the peer address from a request's extensions.
pub type PeerFn = fn(&Extensions) -> Option<IpAddr>;

fn default_peer(ext: &Extensions) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) =
        ext.get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(addr.ip());
    }
    ext.get::<SocketAddr>()
        .map(SocketAddr::ip)
        .or_else(|| ext.get::<IpAddr>().copied())
}

/// Keys requests by the client's IP address, safe behind proxies.
///
/// The peer address comes from the request's extensions: by default Axum's
/// `ConnectInfo<SocketAddr>` (with the crate's `axum` feature; Axum records it when served with
/// `into_make_service_with_connect_info::<SocketAddr>()`), or a `SocketAddr` or an `IpAddr`
/// stored there. Elsewhere (or without the feature), say where it is:
///
/// ```
/// use std::net::SocketAddr;
/// use axum::extract::ConnectInfo;
/// use tower_bulwark::{rate_limit::key::ClientIp, Quota, RateLimitLayer};
///
/// let client_ip = ClientIp::new()
///     .peer_addr(|ext| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()))
///     .trust_proxies(["10.0.0.0/8", "127.0.0.1"])?;
/// let layer = RateLimitLayer::keyed(Quota::per_second(5)?, client_ip);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// When the peer is not a trusted proxy, the key is the peer address, whatever the headers
/// say. When it is, the forwarding header is read from right to left (every occurrence of the
/// header, in order), entry by entry from its raw bytes, skipping trusted proxies (and empty
/// entries); the first address that is not one is the client. What the client wrote left of
/// that entry (bytes that are not text included) is never read, so it cannot change the key.
/// If every entry is a trusted address, the leftmost is the client (a trusted host that made
/// the request).
///
/// When no client address can be found there is no key: no peer address at all; or a
/// trusted proxy's request whose header holds no address (the header absent, the proxy
/// writes the other header, `for=unknown`, an obfuscated identifier) or an entry that cannot
/// be parsed before a client address is found (the chain cannot be trusted further). The
/// limiter never keys such requests by the proxy's address, which would put every client
/// behind it under one limit: it refuses them by default (see
/// [`MissingKey`](super::MissingKey)), warns once and counts them
/// ([`RateLimitHandle::missing_keys`](super::RateLimitHandle::missing_keys)).
///
/// # `X-Forwarded-For` or `Forwarded`
///
/// Only one header is read (see [`ForwardedHeader`]): reading both would let a client forge
/// the one its proxy does not write. `X-Forwarded-For` is read by default (nginx's
/// `proxy_add_x_forwarded_for`, HAProxy's `option forwardfor`, Envoy, AWS and Google load
/// balancers write it); call [`use_forwarded`](ClientIp::use_forwarded) when your proxies
/// write RFC 7239's `Forwarded: for=...` instead. A count of
/// [`missing_keys`](super::RateLimitHandle::missing_keys) that grows with every request
/// through a trusted proxy usually means the other header is the one it writes.
///
/// # IPv6
///
/// IPv6 clients are keyed by their first 64 bits by default: a subscriber holds at least a
/// /64 and its system rotates the addresses in it by itself, so a limit per /128 would let one
/// client take a fresh burst with each address. [`ipv6_prefix`](ClientIp::ipv6_prefix) sets
/// another prefix (`ipv6_prefix(128)` keys each address on its own, `48` each site). IPv4 (and
/// IPv4-mapped IPv6) addresses are keyed whole.
///
/// An IPv6-only server behind a stateless translator (NAT64, SIIT-DC) sees every IPv4 client
/// as an address of the translator's /96 prefix with the client's IPv4 address in its last 32
/// bits: keyed by /64, the whole IPv4 internet would share one limit. Addresses in the
/// well-known prefix `64:ff9b::/96` (RFC 6052) are therefore keyed by the IPv4 address they
/// embed, as IPv4-mapped ones are; [`ipv4_translators`](ClientIp::ipv4_translators) names a
/// network's own translator prefixes.
#[derive(Clone)]
pub struct ClientIp {
    trusted: Arc<[IpNet]>,
    header: ForwardedHeader,
    peer: PeerFn,
    v6_prefix: u8,
    // The /96 prefixes (their upper 96 bits) whose addresses embed an IPv4 client.
    translators: Arc<[u128]>,
}

/// The well-known NAT64 prefix `64:ff9b::/96` (RFC 6052), as the upper 96 bits of a `u128`.
const WELL_KNOWN_NAT64: u128 = 0x0064_ff9b_0000_0000_0000_0000_0000_0000;

impl Default for ClientIp {
    fn default() -> Self {
        ClientIp::new()
    }
}

impl fmt::Debug for ClientIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIp")
            .field("trusted", &self.trusted)
            .field("header", &self.header)
            .field("v6_prefix", &self.v6_prefix)
            .field(
                "ipv4_translators",
                &self
                    .translators
                    .iter()
                    .map(|p| std::net::Ipv6Addr::from(*p))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ClientIp {
    /// The peer address only; no proxy trusted; IPv6 keyed by /64 (see the type docs).
    pub fn new() -> Self {
        ClientIp {
            trusted: Arc::from(Vec::new()),
            header: ForwardedHeader::XForwardedFor,
            peer: default_peer,
            v6_prefix: DEFAULT_IPV6_PREFIX,
            translators: Arc::from(vec![WELL_KNOWN_NAT64]),
        }
    }

    /// The /96 prefixes of the IPv4/IPv6 translators (NAT64, SIIT-DC) in front of the server,
    /// whose addresses carry an IPv4 client in their last 32 bits: such addresses are keyed
    /// by that IPv4 address. Replaces the default, the well-known prefix `64:ff9b::/96`
    /// (give it again to keep it; give none to key translated addresses as any IPv6).
    ///
    /// # Errors
    ///
    /// [`InvalidNetwork`] for a network that does not parse, is not IPv6, or is not a /96.
    ///
    /// ```
    /// use tower_bulwark::rate_limit::key::ClientIp;
    ///
    /// let ip = ClientIp::new().ipv4_translators(["64:ff9b::/96", "2001:db8:64::/96"])?;
    /// assert!(ClientIp::new().ipv4_translators(["2001:db8::/64"]).is_err());
    /// # let _ = ip;
    /// # Ok::<(), tower_bulwark::rate_limit::key::InvalidNetwork>(())
    /// ```
    pub fn ipv4_translators<'a>(
        mut self,
        networks: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, InvalidNetwork> {
        let mut prefixes = Vec::new();
        for text in networks {
            let net: IpNet = text.parse()?;
            match net.addr {
                IpAddr::V6(v6) if net.prefix == 96 => {
                    prefixes.push(u128::from(v6) & !u128::from(u32::MAX));
                }
                _ => return Err(InvalidNetwork(text.to_owned())),
            }
        }
        self.translators = Arc::from(prefixes);
        Ok(self)
    }

    /// Trusts these proxy networks (`"10.0.0.0/8"`, `"::1"`...) to report the client's
    /// address.
    pub fn trust_proxies<'a>(
        mut self,
        networks: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, InvalidNetwork> {
        let nets = networks
            .into_iter()
            .map(str::parse)
            .collect::<Result<Vec<IpNet>, _>>()?;
        self.trusted = Arc::from(nets);
        Ok(self)
    }

    /// Reads the client address from `Forwarded` (RFC 7239) instead of `X-Forwarded-For`.
    pub fn use_forwarded(mut self) -> Self {
        self.header = ForwardedHeader::Forwarded;
        self
    }

    /// Where to find the peer address in the request's extensions.
    pub fn peer_addr(mut self, f: PeerFn) -> Self {
        self.peer = f;
        self
    }

    /// Keys IPv6 clients by their first `prefix` bits, in `1..=128` (default 64: one
    /// subscriber gets a whole /64; 128 keys each address on its own).
    ///
    /// # Errors
    ///
    /// [`InvalidPrefix`] for 0 (every IPv6 client in one bucket) or more than 128.
    ///
    /// ```
    /// use tower_bulwark::rate_limit::key::ClientIp;
    ///
    /// // Each IPv6 address on its own (where one client cannot take several).
    /// let ip = ClientIp::new().ipv6_prefix(128)?;
    /// assert!(ClientIp::new().ipv6_prefix(0).is_err());
    /// # let _ = ip;
    /// # Ok::<(), tower_bulwark::rate_limit::key::InvalidPrefix>(())
    /// ```
    pub fn ipv6_prefix(mut self, prefix: u8) -> Result<Self, InvalidPrefix> {
        if prefix == 0 || prefix > 128 {
            return Err(InvalidPrefix(prefix));
        }
        self.v6_prefix = prefix;
        Ok(self)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(ip))
    }

    /// The client address of a request, as described in the type docs (an IPv6 address cut
    /// to the key prefix), or `None` when none can be found.
    pub fn client_ip<B>(&self, req: &Request<B>) -> Option<IpAddr> {
        let peer = (self.peer)(req.extensions())?.to_canonical();
        let ip = if self.trusted.is_empty() || !self.is_trusted(peer) {
            peer
        } else {
            self.forwarded_client(req.headers())?
        };
        Some(self.mask(ip))
    }

    /// The client a trusted proxy forwarded, or `None` when the header holds none.
    fn forwarded_client(&self, headers: &http::HeaderMap) -> Option<IpAddr> {
        let name = match self.header {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        };
        let mut last_trusted = None;
        for value in headers.get_all(name).iter().rev() {
            // From the bytes, entry by entry: what the client wrote left of the entries the
            // proxies appended (even bytes that are not text) is never read unless every
            // entry right of it is a trusted proxy.
            for entry in value.as_bytes().rsplit(|&b| b == b',') {
                if entry.iter().all(|b| matches!(b, b' ' | b'\t')) {
                    // An empty list element, which recipients ignore.
                    continue;
                }
                let parsed = std::str::from_utf8(entry)
                    .ok()
                    .and_then(|entry| match self.header {
                        ForwardedHeader::XForwardedFor => parse_xff_entry(entry),
                        ForwardedHeader::Forwarded => parse_forwarded_entry(entry),
                    });
                match parsed {
                    Some(ip) if self.is_trusted(ip) => last_trusted = Some(ip),
                    Some(ip) => return Some(ip),
                    // Not an address before the client was found: the chain cannot be
                    // trusted further, and no client is known.
                    None => return None,
                }
            }
        }
        // Every entry trusted: the leftmost made the request (none: no address at all).
        last_trusted
    }

    fn mask(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6)
                if self
                    .translators
                    .contains(&(u128::from(v6) & !u128::from(u32::MAX))) =>
            {
                // A translated IPv4 client: keyed by its IPv4 address.
                IpAddr::V4((u128::from(v6) as u32).into())
            }
            IpAddr::V6(v6) if self.v6_prefix < 128 => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.v6_prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
            ip => ip,
        }
    }
}

fn parse_ip_port(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    // "[v6]" without a port.
    s.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
}

fn parse_xff_entry(entry: &str) -> Option<IpAddr> {
    parse_ip_port(entry)
}

/// One element of `Forwarded`: `for=192.0.2.60;proto=http;by=203.0.113.43`, with `for` maybe
/// quoted (`for="[2001:db8::1]:4711"`). Obfuscated identifiers and `unknown` are not
/// addresses.
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    entry.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        parse_ip_port(v)
    })
}

impl<B> KeyFn<Request<B>> for ClientIp {
    type Key = IpAddr;

    #[inline]
    fn key(&self, req: &Request<B>) -> Option<IpAddr> {
        self.client_ip(req)
    }

    fn missing_key_is_server_fault(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(peer: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut r = b.body(()).unwrap();
        r.extensions_mut()
            .insert(peer.parse::<SocketAddr>().unwrap());
        r
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn untrusted_peer_is_the_key_whatever_headers_say() {
        let c = ClientIp::new().trust_proxies(["10.0.0.0/8"]).unwrap();
        let r = req("203.0.113.9:5000", &[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(c.client_ip(&r), ip("203.0.113.9"));
        let c = ClientIp::new();
        let r = req("10.0.0.1:5000", &[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(c.client_ip(&r), ip("10.0.0.1"));
    }

    #[test]
    fn rightmost_untrusted_forwarded_for() {
        let c = ClientIp::new()
            .trust_proxies(["10.0.0.0/8", "192.168.0.0/16"])
            .unwrap();
        // The client forged "6.6.6.6"; the proxy appended the real address 198.51.100.7.
        let r = req(
            "10.0.0.2:443",
            &[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 192.168.1.1")],
        );
        assert_eq!(c.client_ip(&r), ip("198.51.100.7"));
        // Several header lines are one list, in order.
        let r = req(
            "10.0.0.2:443",
            &[
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-for", "198.51.100.8"),
            ],
        );
        assert_eq!(c.client_ip(&r), ip("198.51.100.8"));
        // Malformed before a client is found: no client known, no key (never the proxy's).
        let r = req(
            "10.0.0.2:443",
            &[("x-forwarded-for", "1.2.3.4, garbage, 10.9.9.9")],
        );
        assert_eq!(c.client_ip(&r), None);
        // All trusted: the leftmost made the request. No header, or no entry: no key.
        let r = req("10.0.0.2:443", &[("x-forwarded-for", "10.1.1.1, 10.2.2.2")]);
        assert_eq!(c.client_ip(&r), ip("10.1.1.1"));
        let r = req("10.0.0.2:443", &[]);
        assert_eq!(c.client_ip(&r), None);
        let r = req("10.0.0.2:443", &[("x-forwarded-for", " , ")]);
        assert_eq!(c.client_ip(&r), None);
        // Empty list elements are skipped.
        let r = req(
            "10.0.0.2:443",
            &[("x-forwarded-for", "6.6.6.6, 198.51.100.7, , 10.1.1.1,")],
        );
        assert_eq!(c.client_ip(&r), ip("198.51.100.7"));
        // Ports and brackets.
        let c = c.ipv6_prefix(128).unwrap();
        let r = req("10.0.0.2:443", &[("x-forwarded-for", "[2001:db8::1]:4711")]);
        assert_eq!(c.client_ip(&r), ip("2001:db8::1"));
    }

    #[test]
    fn bytes_left_of_the_client_entry_are_never_read() {
        let c = ClientIp::new().trust_proxies(["10.0.0.0/8"]).unwrap();
        let mut r = req("10.0.0.2:443", &[]);
        let v = HeaderValue::from_bytes(b"\xff\xfe, 198.51.100.7, 10.1.1.1").unwrap();
        r.headers_mut().append("x-forwarded-for", v);
        assert_eq!(c.client_ip(&r), ip("198.51.100.7"));
        // Not text right of the client entry: the chain stops, with no client known.
        let mut r = req("10.0.0.2:443", &[]);
        let v = HeaderValue::from_bytes(b"198.51.100.7, \xff, 10.1.1.1").unwrap();
        r.headers_mut().append("x-forwarded-for", v);
        assert_eq!(c.client_ip(&r), None);
        // The same for `Forwarded`, and across header lines.
        let c = c.use_forwarded();
        let mut r = req("10.0.0.2:443", &[]);
        let v = HeaderValue::from_bytes(b"for=\"\xff\"").unwrap();
        r.headers_mut().append("forwarded", v);
        r.headers_mut()
            .append("forwarded", HeaderValue::from_static("for=198.51.100.9"));
        assert_eq!(c.client_ip(&r), ip("198.51.100.9"));
    }

    #[test]
    fn ipv6_prefix_of_zero_or_beyond_an_address_is_refused() {
        let e = ClientIp::new().ipv6_prefix(0).unwrap_err();
        assert_eq!(e, InvalidPrefix(0));
        assert!(e.to_string().contains("every IPv6 client"), "{e}");
        let e = ClientIp::new().ipv6_prefix(129).unwrap_err();
        assert!(e.to_string().contains("1..=128"), "{e}");
        for p in [1, 48, 64, 128] {
            assert!(ClientIp::new().ipv6_prefix(p).is_ok(), "{p}");
        }
        let c = ClientIp::new().ipv6_prefix(1).unwrap();
        let r = req("[8001:db8::1]:1", &[]);
        assert_eq!(c.client_ip(&r), ip("8000::"));
    }

    #[test]
    fn mapped_networks_match_as_ipv4() {
        let n: IpNet = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(n, "10.0.0.0/8".parse().unwrap());
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        // A wider IPv6 network holds the mapped addresses it covers.
        let n: IpNet = "::ffff:0:0/96".parse().unwrap();
        assert!(n.contains("192.0.2.1".parse().unwrap()));
        let n: IpNet = "::ffff:0:0/80".parse().unwrap();
        assert!(n.contains("192.0.2.1".parse().unwrap()));
        let n: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(!n.contains("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn rfc7239_forwarded() {
        let c = ClientIp::new()
            .trust_proxies(["127.0.0.1"])
            .unwrap()
            .ipv6_prefix(128)
            .unwrap()
            .use_forwarded();
        let r = req(
            "127.0.0.1:80",
            &[
                (
                    "forwarded",
                    "for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https",
                ),
                ("x-forwarded-for", "9.9.9.9"),
            ],
        );
        assert_eq!(c.client_ip(&r), ip("2001:db8:cafe::17"));
        // No address in the header read: no key, never the proxy's address.
        for value in ["for=unknown", "for=_hidden", "proto=https"] {
            let r = req("127.0.0.1:80", &[("forwarded", value)]);
            assert_eq!(c.client_ip(&r), None, "{value}");
        }
        let r = req("127.0.0.1:80", &[("x-forwarded-for", "198.51.100.1")]);
        assert_eq!(c.client_ip(&r), None);
    }

    #[test]
    fn networks_and_prefixes() {
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.255.0.1".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("banana".parse::<IpNet>().is_err());
        assert!(ClientIp::new().trust_proxies(["nope"]).is_err());
        let c = ClientIp::new().ipv6_prefix(64).unwrap();
        let r = req("[2001:db8:1:2:3:4:5:6]:1", &[]);
        assert_eq!(c.client_ip(&r), ip("2001:db8:1:2::"));
        let r = Request::new(());
        assert_eq!(ClientIp::new().client_ip(&r), None);
    }

    #[test]
    fn ipv6_is_keyed_by_its_64_by_default() {
        let c = ClientIp::new();
        let a = req("[2001:db8:1:2:aaaa::1]:1", &[]);
        let b = req("[2001:db8:1:2:bbbb::2]:1", &[]);
        assert_eq!(c.client_ip(&a), ip("2001:db8:1:2::"));
        assert_eq!(c.client_ip(&a), c.client_ip(&b));
        let other = req("[2001:db8:1:3::1]:1", &[]);
        assert_ne!(c.client_ip(&a), c.client_ip(&other));
        // IPv4 and IPv4-mapped addresses are whole.
        let v4 = req("[::ffff:192.0.2.7]:1", &[]);
        assert_eq!(c.client_ip(&v4), ip("192.0.2.7"));
        // Opting out: each address on its own.
        let c = c.ipv6_prefix(128).unwrap();
        assert_eq!(c.client_ip(&a), ip("2001:db8:1:2:aaaa::1"));
    }

    #[test]
    fn header_key_is_one_non_blank_visible_value() {
        let h = Header::new("x-api-key");
        let key = |headers: &[&[u8]]| {
            let mut r = Request::new(());
            for v in headers {
                r.headers_mut()
                    .append("x-api-key", HeaderValue::from_bytes(v).unwrap());
            }
            KeyFn::key(&h, &r)
        };
        assert_eq!(key(&[b"alice"]), Some(HeaderValue::from_static("alice")));
        assert_eq!(key(&[]), None);
        assert_eq!(key(&[b""]), None);
        assert_eq!(key(&[b" \t "]), None);
        assert_eq!(key(&[b"caf\xc3\xa9"]), None);
        assert_eq!(key(&[b"alice", b"bob"]), None);
    }

    /// Outside input, as arbitrary bytes: an answer, never a panic.
    mod never_panics {
        use super::*;
        use proptest::prelude::*;

        /// Pieces of forwarding headers, so that generated values are often nearly valid.
        fn forwarding_text() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                Just("for=".to_owned()),
                Just("For = ".to_owned()),
                Just("\"".to_owned()),
                Just("[".to_owned()),
                Just("]".to_owned()),
                Just(":".to_owned()),
                Just(",".to_owned()),
                Just(";".to_owned()),
                Just("=".to_owned()),
                Just(" ".to_owned()),
                Just("203.0.113.7".to_owned()),
                Just("127.0.0.1".to_owned()),
                Just("2001:db8::1".to_owned()),
                Just("::ffff:10.0.0.1".to_owned()),
                Just("4711".to_owned()),
                Just("unknown".to_owned()),
                Just("_hidden".to_owned()),
                "\\PC{0,3}",
            ];
            proptest::collection::vec(piece, 0..16).prop_map(|v| v.concat())
        }

        proptest! {
            #[test]
            fn forwarding_headers_of_arbitrary_bytes_never_panic(
                values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..4),
                shaped in proptest::collection::vec(forwarding_text(), 0..3),
                forwarded in any::<bool>(),
                trusted_peer in any::<bool>(),
            ) {
                let mut c = ClientIp::new()
                    .trust_proxies(["127.0.0.0/8", "10.0.0.0/8", "::1"])
                    .unwrap();
                if forwarded {
                    c = c.use_forwarded();
                }
                let name = if forwarded { "forwarded" } else { "x-forwarded-for" };
                let peer = if trusted_peer { "127.0.0.1:80" } else { "203.0.113.9:5000" };
                let mut r = req(peer, &[]);
                let raw = values.iter().map(Vec::as_slice).chain(shaped.iter().map(String::as_bytes));
                for v in raw {
                    if let Ok(v) = HeaderValue::from_bytes(v) {
                        r.headers_mut().append(name, v);
                    }
                }
                // An untrusted peer is its own key; a trusted one's key is what it forwarded,
                // or none.
                let got = c.client_ip(&r);
                if !trusted_peer {
                    prop_assert_eq!(got, ip("203.0.113.9"));
                }
            }

            #[test]
            fn forwarding_entries_never_panic(s in forwarding_text(), t in "\\PC*") {
                for entry in [s.as_str(), t.as_str()] {
                    let _ = parse_xff_entry(entry);
                    let _ = parse_forwarded_entry(entry);
                }
            }
        }
    }
}
