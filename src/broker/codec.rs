//! The MQTT codec of sensor connections: rumqttc's MQTT 3.1.1 codec plus the checks that must
//! happen before a whole CONNECT is read (protocol level, pre-login packet size). It must not
//! know about devices or sessions.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Codec, Packet};
use rumqttc::mqttbytes::Error as MqttError;
use tokio_util::codec::{Decoder, Encoder};

/// rumqttc's MQTT 3.1.1 codec, which before login also refuses any other protocol level (so
/// that an MQTT 5 or 3.1 CONNECT gets CONNACK 0x01) and packets over the pre-login limit.
pub(super) struct FrontCodec {
    inner: Codec,
    prelogin: bool,
}

impl FrontCodec {
    pub(super) fn new(max_prelogin: usize, max_packet: usize) -> FrontCodec {
        FrontCodec {
            inner: Codec {
                max_incoming_size: max_prelogin,
                max_outgoing_size: max_packet,
            },
            prelogin: true,
        }
    }

    pub(super) fn logged_in(&mut self, max_packet: usize) {
        self.prelogin = false;
        self.inner.max_incoming_size = max_packet;
    }
}

/// Checks the protocol name and level of a CONNECT at the start of `src` (once enough bytes
/// are there): only "MQTT" level 4 (3.1.1) passes.
fn check_protocol(src: &[u8]) -> Result<(), MqttError> {
    if src.first().map(|b| b >> 4) != Some(1) {
        return Ok(()); // Not a CONNECT: the caller refuses it.
    }
    let mut pos = 1;
    loop {
        let Some(&b) = src.get(pos) else {
            return Ok(());
        };
        pos += 1;
        if b & 0x80 == 0 {
            break;
        }
        if pos > 4 {
            return Err(MqttError::MalformedRemainingLength);
        }
    }
    let Some(len) = src.get(pos..pos + 2) else {
        return Ok(());
    };
    let len = u16::from_be_bytes([len[0], len[1]]) as usize;
    let Some(name) = src.get(pos + 2..pos + 2 + len) else {
        return Ok(());
    };
    let Some(&level) = src.get(pos + 2 + len) else {
        return Ok(());
    };
    match (name, level) {
        (b"MQTT", 4) => Ok(()),
        (b"MQTT" | b"MQIsdp", n) => Err(MqttError::InvalidProtocolLevel(n)),
        _ => Err(MqttError::InvalidProtocol),
    }
}

impl Decoder for FrontCodec {
    type Item = Packet;
    type Error = MqttError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, MqttError> {
        if self.prelogin {
            check_protocol(src)?;
        }
        self.inner.decode(src)
    }
}

impl Encoder<Packet> for FrontCodec {
    type Error = MqttError;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), MqttError> {
        self.inner.encode(item, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(name: &[u8], level: u8) -> Vec<u8> {
        let mut v = vec![0x10, 0];
        v.extend_from_slice(&(name.len() as u16).to_be_bytes());
        v.extend_from_slice(name);
        v.push(level);
        v.extend_from_slice(&[0x02, 0, 60, 0, 1, b'x']);
        v[1] = (v.len() - 2) as u8;
        v
    }

    #[test]
    fn only_mqtt_311_passes_the_protocol_check() {
        assert!(check_protocol(&connect_bytes(b"MQTT", 4)).is_ok());
        assert!(matches!(
            check_protocol(&connect_bytes(b"MQTT", 5)),
            Err(MqttError::InvalidProtocolLevel(5))
        ));
        assert!(matches!(
            check_protocol(&connect_bytes(b"MQIsdp", 3)),
            Err(MqttError::InvalidProtocolLevel(3))
        ));
        assert!(matches!(
            check_protocol(&connect_bytes(b"HTTP", 4)),
            Err(MqttError::InvalidProtocol)
        ));
        // Partial input waits for more bytes.
        let full = connect_bytes(b"MQTT", 5);
        for n in 0..8 {
            assert!(check_protocol(&full[..n]).is_ok(), "{n}");
        }
    }
}
