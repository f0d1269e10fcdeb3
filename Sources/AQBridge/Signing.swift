internal import CAQOpenSSL
import Foundation

/// SHA-256 (FIPS 180-4), from OpenSSL's libcrypto.
enum SHA256 {
    static func hash(_ bytes: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        var size: UInt32 = 0
        let ok = bytes.withUnsafeBytes { raw in
            out.withUnsafeMutableBufferPointer { EVP_Digest(raw.baseAddress, raw.count, $0.baseAddress, &size, EVP_sha256(), nil) }
        }
        precondition(ok == 1 && size == 32, "OpenSSL's SHA-256 failed")
        return out
    }
}

/// HMAC-SHA256 with one key, its inner and outer digest states computed once (OpenSSL's
/// EVP_MAC). Not thread-safe: one thread owns it (aq-bridge's connection thread).
final class HMACKey {
    private let context: OpaquePointer

    init?(_ key: [UInt8]) {
        guard let context = key.withUnsafeBytes({ aq_hmac_sha256_new($0.baseAddress, $0.count) }) else { return nil }
        self.context = context
    }

    deinit { EVP_MAC_CTX_free(self.context) }

    /// The MAC of `prefix` followed by `body` into `out` (32 bytes), without joining them.
    func mac(_ prefix: UnsafeRawBufferPointer, _ body: UnsafeRawBufferPointer, into out: UnsafeMutablePointer<UInt8>) {
        let ok = aq_hmac_sha256(self.context, prefix.baseAddress, prefix.count, body.baseAddress, body.count, out)
        precondition(ok == 1, "OpenSSL's HMAC-SHA256 failed")
    }
}

/// HMAC-SHA256 (RFC 2104), from OpenSSL's libcrypto.
enum HMACSHA256 {
    static func mac(key: [UInt8], message: [UInt8]) -> [UInt8] {
        message.withUnsafeBytes { Self.mac(key: key, message: $0) }
    }

    static func mac(key: [UInt8], message: UnsafeRawBufferPointer) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        var size: UInt32 = 0
        let result = key.withUnsafeBytes { k in
            out.withUnsafeMutableBufferPointer { o in
                HMAC(EVP_sha256(), k.baseAddress, Int32(k.count), message.baseAddress?.assumingMemoryBound(to: UInt8.self), message.count,
                     o.baseAddress, &size)
            }
        }
        precondition(result != nil && size == 32, "OpenSSL's HMAC-SHA256 failed")
        return out
    }
}

/// Signs requests as the Standard Webhooks specification says: headers `webhook-id`,
/// `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`,
/// one signature per secret (space-separated) so secrets can be rotated.
public struct WebhookSigner: Sendable {
    /// Keys decoded from `whsec_<base64>` secrets (or raw secrets, used as UTF-8 bytes).
    let keys: [[UInt8]]

    public struct InvalidSecret: Error, CustomStringConvertible {
        public var description: String
    }

    /// - Parameter secrets: `whsec_…` strings (Standard Webhooks format); the first signs first.
    public init(secrets: [String]) throws {
        self.keys = try secrets.map { secret in
            if secret.hasPrefix("whsec_") {
                guard let data = Data(base64Encoded: String(secret.dropFirst(6))), !data.isEmpty else {
                    throw InvalidSecret(description: "a signing secret starting with whsec_ must continue with base64")
                }
                return Array(data)
            }
            guard secret.utf8.count >= 16 else { throw InvalidSecret(description: "a signing secret must be at least 16 bytes") }
            return Array(secret.utf8)
        }
    }

    public var isEnabled: Bool { !self.keys.isEmpty }

    /// The `webhook-signature` header value for a message.
    public func signature(id: String, timestamp: Int, body: [UInt8]) -> String {
        var message = Array("\(id).\(timestamp).".utf8)
        message.append(contentsOf: body)
        return message.withUnsafeBytes { raw in
            self.keys.map { "v1," + Data(HMACSHA256.mac(key: $0, message: raw)).base64EncodedString() }.joined(separator: " ")
        }
    }

    /// A signer for one thread that keeps each key's HMAC state: cheaper per request.
    public func makeContext() -> SigningContext { SigningContext(keys: self.keys) }
}

/// Signs for one thread (aq-bridge's connection thread): each secret's HMAC-SHA256 state is
/// computed once, so a signature costs the message's own hashing. Not `Sendable`.
public final class SigningContext {
    private let keys: [HMACKey]

    init(keys: [[UInt8]]) {
        self.keys = keys.compactMap(HMACKey.init)
        precondition(self.keys.count == keys.count, "OpenSSL could not key HMAC-SHA256")
    }

    public var isEnabled: Bool { !self.keys.isEmpty }

    /// The `webhook-signature` header value: `v1,<base64>` per secret, space-separated.
    public func signature(id: String, timestamp: Int, body: [UInt8]) -> String {
        self.signature(id: id, timestamp: timestamp, body: body[...])
    }

    public func signature(id: String, timestamp: Int, body: ArraySlice<UInt8>) -> String {
        self.write(id: id, timestamp: timestamp, body: body, after: "")
    }

    /// The whole header line, `webhook-signature: v1,<base64> …`, built in one allocation (the
    /// signed content `<id>.<timestamp>.<body>` is hashed in place).
    public func headerLine(id: String, timestamp: Int, body: ArraySlice<UInt8>) -> String {
        self.write(id: id, timestamp: timestamp, body: body, after: "webhook-signature: ")
    }

    /// Appends the header line (without an end) to `out`: no allocation of its own when `out`
    /// has room (this runs for every request).
    public func appendHeaderLine(id: String, timestamp: Int, body: ArraySlice<UInt8>, to out: inout [UInt8]) {
        let lead: StaticString = "webhook-signature: "
        let capacity = self.capacity(after: lead)
        let start = out.count
        out.append(contentsOf: repeatElement(0, count: capacity))
        let written = out.withUnsafeMutableBufferPointer { buffer in
            self.fill(UnsafeMutableBufferPointer(rebasing: buffer[start...]), id: id, timestamp: timestamp, body: body, after: lead)
        }
        out.removeLast(capacity - written)
    }

    private static let base64: StaticString = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    private func capacity(after lead: StaticString) -> Int { lead.utf8CodeUnitCount + self.keys.count * 48 }

    private func write(id: String, timestamp: Int, body: ArraySlice<UInt8>, after lead: StaticString) -> String {
        String(unsafeUninitializedCapacity: self.capacity(after: lead)) { out in
            self.fill(out, id: id, timestamp: timestamp, body: body, after: lead)
        }
    }

    /// Writes `lead` and the signatures into `out` (at least ``capacity(after:)`` bytes); returns
    /// how many bytes it wrote.
    private func fill(_ out: UnsafeMutableBufferPointer<UInt8>, id: String, timestamp: Int, body: ArraySlice<UInt8>, after lead: StaticString) -> Int {
        var id = id
        return id.withUTF8 { idBytes in
            // `<id>.<timestamp>.` on the stack.
            withUnsafeTemporaryAllocation(of: UInt8.self, capacity: idBytes.count + 24) { prefix in
                var n = 0
                for byte in idBytes { prefix[n] = byte; n += 1 }
                prefix[n] = UInt8(ascii: "."); n += 1
                // (A Unix time in seconds is 10 digits: a small string, no allocation.)
                for byte in String(timestamp).utf8 { prefix[n] = byte; n += 1 }
                prefix[n] = UInt8(ascii: "."); n += 1
                let head = UnsafeRawBufferPointer(rebasing: UnsafeMutableRawBufferPointer(prefix)[0..<n])
                return body.withUnsafeBytes { tail in
                    withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 32) { mac in
                        var o = 0
                        for k in 0..<lead.utf8CodeUnitCount { out[o] = lead.utf8Start[k]; o += 1 }
                        for (index, key) in self.keys.enumerated() {
                            if index > 0 { out[o] = UInt8(ascii: " "); o += 1 }
                            out[o] = UInt8(ascii: "v"); out[o + 1] = UInt8(ascii: "1"); out[o + 2] = UInt8(ascii: ","); o += 3
                            if let digest = mac.baseAddress { key.mac(head, tail, into: digest) }
                            o = Self.encodeBase64(UnsafeBufferPointer(mac), into: out, at: o)
                        }
                        return o
                    }
                }
            }
        }
    }

    /// Standard base64 with padding of `bytes` into `out` from `at`; returns the new end.
    private static func encodeBase64(_ bytes: UnsafeBufferPointer<UInt8>, into out: UnsafeMutableBufferPointer<UInt8>, at start: Int) -> Int {
        let table = Self.base64.utf8Start
        var o = start, i = 0
        while i + 3 <= bytes.count {
            let v = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8 | UInt32(bytes[i + 2])
            out[o] = table[Int(v >> 18 & 63)]; out[o + 1] = table[Int(v >> 12 & 63)]
            out[o + 2] = table[Int(v >> 6 & 63)]; out[o + 3] = table[Int(v & 63)]
            o += 4; i += 3
        }
        let rest = bytes.count - i
        if rest > 0 {
            let v = UInt32(bytes[i]) << 16 | (rest == 2 ? UInt32(bytes[i + 1]) << 8 : 0)
            out[o] = table[Int(v >> 18 & 63)]; out[o + 1] = table[Int(v >> 12 & 63)]
            out[o + 2] = rest == 2 ? table[Int(v >> 6 & 63)] : UInt8(ascii: "="); out[o + 3] = UInt8(ascii: "=")
            o += 4
        }
        return o
    }
}
