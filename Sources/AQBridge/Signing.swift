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
}
