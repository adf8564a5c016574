//! Certificates made at test time (rcgen): a CA, and a server certificate it signed.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// A CA certificate, and a server certificate it signed with its key, all PEM.
pub struct CertPair {
    /// The CA's certificate: what a client trusts.
    pub ca: String,
    /// The server's certificate.
    pub cert: String,
    /// The server's private key.
    pub key: String,
}

/// A new CA named `ca_name`, and a server certificate it signed for `names` (host names or
/// IP addresses; the first is also the subject's common name).
pub fn cert_pair(ca_name: &str, names: &[&str]) -> CertPair {
    assert!(!names.is_empty(), "a server certificate needs a name");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("a CA key"))
        .expect("a self-signed CA");
    let key = KeyPair::generate().expect("a server key");
    let mut server =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("server certificate parameters");
    server.distinguished_name.push(DnType::CommonName, names[0]);
    let server = server
        .signed_by(&key, &ca)
        .expect("a signed server certificate");
    CertPair {
        ca: ca.pem(),
        cert: server.pem(),
        key: key.serialize_pem(),
    }
}
