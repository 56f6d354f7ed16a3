//! A throw-away PKI made by the test: a CA, a server certificate for 127.0.0.1 and a client
//! certificate whose CN is the device's MQTT client id; [`renewed_client`] issues another
//! client certificate from the same CA, as a renewal would.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, Issuer, KeyPair};

/// PEM files written into a directory.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate.
    pub ca: PathBuf,
    /// Server certificate and key.
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate (CN = the device name given).
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
    /// A CA that signed nothing here: trusting it must fail verification.
    pub other_ca: PathBuf,
    /// The CA's key, for [`renewed_client`].
    pub ca_key: PathBuf,
}

/// The CN of the test CA.
const CA_CN: &str = "evp test CA";

fn ca_params(cn: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    Ok(params)
}

fn ca(cn: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    Ok(CertifiedIssuer::self_signed(
        ca_params(cn)?,
        KeyPair::generate()?,
    )?)
}

/// A certificate signed by `issuer` for `sans` with CN `cn`, and its new key (PEM).
fn leaf(issuer: &Issuer<'_, KeyPair>, sans: Vec<String>, cn: &str) -> Result<(String, String)> {
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A new client certificate with CN `cn` and its new key (PEM), issued by the CA of `pki`.
pub fn renewed_client(pki: &Pki, cn: &str) -> Result<(String, String)> {
    let key = KeyPair::from_pem(&std::fs::read_to_string(&pki.ca_key)?)?;
    leaf(&Issuer::new(ca_params(CA_CN)?, key), vec![], cn)
}

/// Makes the PKI in `dir`, with the client certificate's CN set to `device`.
pub fn make(dir: &Path, device: &str) -> Result<Pki> {
    make_for(dir, device, &["127.0.0.1", "localhost"])
}

/// [`make`], with a server certificate for `server_names` alone.
pub fn make_for(dir: &Path, device: &str, server_names: &[&str]) -> Result<Pki> {
    let ca = ca(CA_CN)?;
    let sans = server_names.iter().map(|n| n.to_string()).collect();
    let (server_cert, server_key) = leaf(&ca, sans, "broker")?;
    let (client_cert, client_key) = leaf(&ca, vec![], device)?;
    let write = |name: &str, text: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    Ok(Pki {
        ca: write("ca.pem", &ca.pem())?,
        server_cert: write("server.pem", &server_cert)?,
        server_key: write("server.key", &server_key)?,
        client_cert: write("client.pem", &client_cert)?,
        client_key: write("client.key", &client_key)?,
        other_ca: write("other-ca.pem", &self::ca("unrelated CA")?.pem())?,
        ca_key: write("ca.key", &ca.key().serialize_pem())?,
    })
}
