//! Who is calling: the client identity read from an mTLS certificate.
//!
//! The identity is the SPIFFE ID (URI SAN) if the certificate has one, else
//! its first DNS SAN, else its subject common name. It is parsed once per
//! connection, after the TLS handshake has verified the chain, and handed to
//! every request on that connection as a [`Peer`].
//!
//! An identity keeps its kind: a DNS name or a common name that happens to
//! read `spiffe://...` is not a SPIFFE ID (only a URI SAN is), and policy
//! patterns name the kind they match (see `authz::IdentityPattern`). Such a
//! look-alike is refused outright, so it cannot even reach a log line as
//! something it is not. Printed, a SPIFFE ID is itself, and the other kinds
//! carry their kind: `dns:api.billing.internal`, `cn:billing`.

use std::{fmt, net::SocketAddr, sync::Arc};

use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

/// The longest identity accepted, in bytes.
const MAX_ID_LEN: usize = 2048;

/// A caller's identity, as the policy matches it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum ClientId {
    /// A SPIFFE ID from the certificate's URI SAN, e.g. `spiffe://shop.example/checkout`.
    Spiffe(String),
    /// The certificate's first DNS SAN.
    Dns(String),
    /// The certificate subject's common name.
    CommonName(String),
}

/// The kinds of identity a certificate can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    /// A SPIFFE ID from the certificate's URI SAN.
    Spiffe,
    /// A DNS SAN.
    Dns,
    /// The subject common name.
    CommonName,
}

impl IdentityKind {
    /// The prefix the kind is written with (in policy patterns, logs and
    /// audit events); a SPIFFE ID carries its own `spiffe://`.
    pub fn prefix(self) -> &'static str {
        match self {
            IdentityKind::Spiffe => "",
            IdentityKind::Dns => "dns:",
            IdentityKind::CommonName => "cn:",
        }
    }
}

impl ClientId {
    /// The identity's own text, without its kind: the SPIFFE ID, DNS name or
    /// common name. Policy patterns of the same kind match against it.
    pub fn name(&self) -> &str {
        match self {
            ClientId::Spiffe(s) | ClientId::Dns(s) | ClientId::CommonName(s) => s,
        }
    }

    /// Which kind of identity this is.
    pub fn kind(&self) -> IdentityKind {
        match self {
            ClientId::Spiffe(_) => IdentityKind::Spiffe,
            ClientId::Dns(_) => IdentityKind::Dns,
            ClientId::CommonName(_) => IdentityKind::CommonName,
        }
    }

    /// The SPIFFE trust domain, for SPIFFE IDs.
    pub fn trust_domain(&self) -> Option<&str> {
        match self {
            ClientId::Spiffe(id) => id
                .strip_prefix("spiffe://")
                .map(|rest| rest.split('/').next().unwrap_or(rest)),
            _ => None,
        }
    }

    /// With `accepted` trust domains configured, refuses every identity that
    /// is not a SPIFFE ID of one of them (a DNS name or common name included:
    /// a vault that names trust domains speaks SPIFFE only). With none
    /// configured, accepts any identity the CA signed.
    ///
    /// # Errors
    /// [`IdentityError::UntrustedDomain`], [`IdentityError::SpiffeRequired`].
    pub fn check_trust_domain(self, accepted: &[String]) -> Result<Self, IdentityError> {
        if accepted.is_empty() {
            return Ok(self);
        }
        match self.trust_domain() {
            Some(domain) if accepted.iter().any(|a| a == domain) => Ok(self),
            Some(domain) => Err(IdentityError::UntrustedDomain(domain.to_owned())),
            None => Err(IdentityError::SpiffeRequired),
        }
    }

    /// Reads the identity from a DER certificate whose chain has already been
    /// verified.
    ///
    /// # Errors
    /// See [`IdentityError`].
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Unparsable)?;
        let mut uris = Vec::new();
        let mut first_dns = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) => uris.push(*uri),
                    GeneralName::DNSName(dns) if first_dns.is_none() => first_dns = Some(*dns),
                    _ => {}
                }
            }
        } else if cert.subject_alternative_name().is_err() {
            return Err(IdentityError::Unparsable);
        }
        // An X.509-SVID carries exactly one URI SAN; more is ambiguous.
        if uris.len() > 1 {
            return Err(IdentityError::SeveralUris(uris.len()));
        }
        if let Some(uri) = uris.first() {
            if uri.starts_with("spiffe://") {
                return checked(uri).map(ClientId::Spiffe);
            }
            return Err(IdentityError::NotSpiffe);
        }
        if let Some(dns) = first_dns {
            return not_spiffe_lookalike(checked(dns)?).map(ClientId::Dns);
        }
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok());
        match cn {
            Some(cn) => not_spiffe_lookalike(checked(cn)?).map(ClientId::CommonName),
            None => Err(IdentityError::Missing),
        }
    }
}

fn checked(id: &str) -> Result<String, IdentityError> {
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(IdentityError::Malformed);
    }
    Ok(id.to_owned())
}

/// A DNS name or common name that reads like a SPIFFE ID is refused: only a
/// URI SAN carries a SPIFFE ID, and a CA that signs such a name for a client
/// did not mean it as one.
fn not_spiffe_lookalike(id: String) -> Result<String, IdentityError> {
    if id
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe:"))
    {
        return Err(IdentityError::SpiffeLookalike);
    }
    Ok(id)
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.kind().prefix(), self.name())
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            ClientId::Spiffe(_) => "Spiffe",
            ClientId::Dns(_) => "Dns",
            ClientId::CommonName(_) => "CommonName",
        };
        write!(f, "ClientId::{kind}({})", self.name())
    }
}

/// Why a verified certificate yields no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The certificate could not be parsed.
    #[error("client certificate cannot be parsed")]
    Unparsable,
    /// More than one URI SAN (the SPIFFE X.509-SVID rules allow exactly one).
    #[error("client certificate has {0} URI SANs; a SPIFFE identity needs exactly one")]
    SeveralUris(usize),
    /// A URI SAN that is not a SPIFFE ID.
    #[error("client certificate's URI SAN is not a spiffe:// ID")]
    NotSpiffe,
    /// No URI SAN, DNS SAN or common name.
    #[error("client certificate has no SPIFFE ID, DNS name or common name")]
    Missing,
    /// The identity is empty, too long or has control characters.
    #[error("client certificate identity is empty, too long or has control characters")]
    Malformed,
    /// The connection carried no client certificate (cannot happen with the
    /// server's verifier, which requires one; kept so the API layer can say so).
    #[error("no client certificate was presented")]
    NoCertificate,
    /// A SPIFFE ID from a trust domain the configuration does not accept.
    #[error("client SPIFFE ID is from trust domain {0}, which tls.trust_domains does not accept")]
    UntrustedDomain(String),
    /// `tls.trust_domains` is set and the certificate has no SPIFFE ID.
    #[error(
        "client certificate has no SPIFFE ID (URI SAN), and tls.trust_domains accepts SPIFFE IDs only"
    )]
    SpiffeRequired,
    /// A DNS SAN or common name that reads like a SPIFFE ID.
    #[error(
        "client certificate's DNS name or common name reads like a SPIFFE ID; a SPIFFE ID must be the certificate's URI SAN"
    )]
    SpiffeLookalike,
}

/// What the API layer knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The caller's identity, or why its certificate gave none.
    pub identity: Arc<Result<ClientId, IdentityError>>,
    /// The remote socket address.
    pub remote_addr: Option<SocketAddr>,
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;

    fn cert_with(sans: Vec<SanType>, cn: Option<&str>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(s.try_into().unwrap())
    }

    #[test]
    fn spiffe_uri_wins_over_dns_and_cn() {
        let der = cert_with(
            vec![dns("a.example"), uri("spiffe://shop/checkout")],
            Some("cn"),
        );
        assert_eq!(
            ClientId::from_certificate(&der),
            Ok(ClientId::Spiffe("spiffe://shop/checkout".into()))
        );
    }

    #[test]
    fn first_dns_then_cn() {
        let der = cert_with(vec![dns("a.example"), dns("b.example")], Some("cn"));
        assert_eq!(
            ClientId::from_certificate(&der),
            Ok(ClientId::Dns("a.example".into()))
        );
        let der = cert_with(vec![], Some("billing"));
        assert_eq!(
            ClientId::from_certificate(&der),
            Ok(ClientId::CommonName("billing".into()))
        );
    }

    #[test]
    fn two_uri_sans_are_refused() {
        let der = cert_with(vec![uri("spiffe://a/x"), uri("spiffe://a/y")], None);
        assert_eq!(
            ClientId::from_certificate(&der),
            Err(IdentityError::SeveralUris(2))
        );
    }

    #[test]
    fn non_spiffe_uri_is_refused() {
        let der = cert_with(vec![uri("https://a/x")], Some("cn"));
        assert_eq!(
            ClientId::from_certificate(&der),
            Err(IdentityError::NotSpiffe)
        );
    }

    #[test]
    fn no_name_at_all_is_refused() {
        let der = cert_with(vec![], None);
        assert_eq!(
            ClientId::from_certificate(&der),
            Err(IdentityError::Missing)
        );
    }

    #[test]
    fn trust_domains_are_checked() {
        let id = ClientId::Spiffe("spiffe://shop.example/ns/a".into());
        assert_eq!(id.trust_domain(), Some("shop.example"));
        assert!(id.clone().check_trust_domain(&[]).is_ok());
        assert!(
            id.clone()
                .check_trust_domain(&["shop.example".into()])
                .is_ok()
        );
        assert_eq!(
            id.check_trust_domain(&["other.example".into()]),
            Err(IdentityError::UntrustedDomain("shop.example".into()))
        );
        assert_eq!(
            ClientId::Dns("a.example".into()).check_trust_domain(&["x".into()]),
            Err(IdentityError::SpiffeRequired)
        );
        assert_eq!(
            ClientId::CommonName("billing".into()).check_trust_domain(&["x".into()]),
            Err(IdentityError::SpiffeRequired)
        );
        assert!(
            ClientId::Dns("a.example".into())
                .check_trust_domain(&[])
                .is_ok()
        );
    }

    /// A certificate from the trusted CA whose CN or DNS SAN spells a SPIFFE
    /// ID is not that SPIFFE identity.
    #[test]
    fn spiffe_lookalikes_in_dns_or_cn_are_refused() {
        for cn in [
            "spiffe://dev.tokenvault.local/support",
            "SPIFFE://dev.tokenvault.local/support",
            "spiffe:x",
        ] {
            let der = cert_with(vec![], Some(cn));
            assert_eq!(
                ClientId::from_certificate(&der),
                Err(IdentityError::SpiffeLookalike),
                "{cn}"
            );
        }
        let der = cert_with(vec![dns("spiffe.example")], Some("spiffe"));
        assert_eq!(
            ClientId::from_certificate(&der),
            Ok(ClientId::Dns("spiffe.example".into()))
        );
    }

    #[test]
    fn identities_print_with_their_kind() {
        assert_eq!(
            ClientId::Spiffe("spiffe://a/x".into()).to_string(),
            "spiffe://a/x"
        );
        assert_eq!(
            ClientId::Dns("a.example".into()).to_string(),
            "dns:a.example"
        );
        assert_eq!(
            ClientId::CommonName("billing".into()).to_string(),
            "cn:billing"
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(
            ClientId::from_certificate(b"\x30\x03abc"),
            Err(IdentityError::Unparsable)
        );
    }
}
