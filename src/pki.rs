//! A small certificate authority for development and tests: `--dev` uses it
//! to make its certificates, and the integration tests to make good and bad
//! ones. Production certificates come from cert-manager, SPIFFE or your own
//! CA, never from here.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// A PEM certificate and its PEM private key.
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM. Test and dev material only.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issued(<certificate and key>)")
    }
}

/// What a client certificate names, and when it is valid.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// URI SANs (a SPIFFE ID is one).
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// Subject common name.
    pub common_name: Option<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// The extended key usage the certificate carries.
    pub eku: Eku,
    /// The serial number; random if `None`. Set it to revoke the
    /// certificate later with [`Ca::crl`].
    pub serial: Option<u64>,
}

/// The extended key usage of a test client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eku {
    /// clientAuth: what a client certificate must carry.
    ClientAuth,
    /// serverAuth only: a certificate that must not be accepted as a client's.
    ServerAuth,
    /// No extended key usage extension at all (webpki accepts such a
    /// certificate for any use; the vault does not).
    Absent,
}

impl ClientSpec {
    /// A client with one SPIFFE ID, valid from an hour ago for a year.
    pub fn spiffe(id: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            uris: vec![id.to_owned()],
            dns: Vec::new(),
            common_name: None,
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(365),
            eku: Eku::ClientAuth,
            serial: None,
        }
    }
}

/// A certificate authority that can issue server and client certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca(<redacted>)")
    }
}

impl Ca {
    /// A new self-signed CA named `name`, valid for ten years.
    ///
    /// # Errors
    /// If key generation or signing fails.
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(params, key)?;
        Ok(Self { issuer, key_pem })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A self-signed client certificate as `spec` describes (signed by no CA).
    ///
    /// # Errors
    /// If a name is invalid or signing fails.
    pub fn self_signed_client(spec: &ClientSpec) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::default();
        for uri in &spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for `dns_names` and `ips`, valid for a year.
    ///
    /// # Errors
    /// If a name is invalid or signing fails.
    pub fn issue_server(
        &self,
        dns_names: &[&str],
        ips: &[std::net::IpAddr],
    ) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            DnType::CommonName,
            dns_names.first().copied().unwrap_or("tokenvault"),
        );
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into()?));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365);
        self.sign(&params)
    }

    /// A client certificate as `spec` describes.
    ///
    /// # Errors
    /// If a name is invalid or signing fails.
    pub fn issue_client(&self, spec: &ClientSpec) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::default();
        if let Some(cn) = &spec.common_name {
            params
                .distinguished_name
                .push(DnType::CommonName, cn.as_str());
        }
        for uri in &spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        for dns in &spec.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.as_str().try_into()?));
        }
        params.extended_key_usages = match spec.eku {
            Eku::ClientAuth => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Eku::ServerAuth => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Eku::Absent => Vec::new(),
        };
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.serial_number = spec.serial.map(rcgen::SerialNumber::from);
        self.sign(&params)
    }

    /// A certificate revocation list, valid for a week, revoking `serials`.
    ///
    /// # Errors
    /// If signing fails.
    pub fn crl(&self, serials: &[u64]) -> Result<String, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(7),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*serial),
                    revocation_time: now - Duration::minutes(5),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer)?.pem()
    }

    fn sign(&self, params: &CertificateParams) -> Result<Issued, rcgen::Error> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
