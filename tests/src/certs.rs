//! A throw-away PKI made by the test: a CA, a server certificate for 127.0.0.1 and a client
//! certificate whose CN is the device's MQTT client id.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

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
}

fn ca(cn: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

/// Makes the PKI in `dir`, with the client certificate's CN set to `device`.
pub fn make(dir: &Path, device: &str) -> Result<Pki> {
    make_for(dir, device, &["127.0.0.1", "localhost"])
}

/// [`make`], with a server certificate for `server_names` alone.
pub fn make_for(dir: &Path, device: &str, server_names: &[&str]) -> Result<Pki> {
    let ca = ca("evp test CA")?;
    let leaf = |sans: Vec<String>, cn: &str| -> Result<(String, String)> {
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let sans = server_names.iter().map(|n| n.to_string()).collect();
    let (server_cert, server_key) = leaf(sans, "broker")?;
    let (client_cert, client_key) = leaf(vec![], device)?;
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
    })
}
