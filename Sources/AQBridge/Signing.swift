import Foundation

/// SHA-256 (FIPS 180-4), for HMAC signatures. Small and dependency-free.
struct SHA256 {
    private static let k: [UInt32] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    ]
    private var h: [UInt32] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]
    private var buffer: [UInt8] = []
    private var w = [UInt32](repeating: 0, count: 64)

    init() { self.buffer.reserveCapacity(64) }

    private var total: UInt64 = 0

    mutating func finish() -> [UInt8] {
        let bitLength = self.total &* 8
        self.buffer.append(0x80)
        while self.buffer.count % 64 != 56 {
            if self.buffer.count == 64 { self.block(); self.buffer.removeAll(keepingCapacity: true) }
            self.buffer.append(0)
        }
        for shift in stride(from: 56, through: 0, by: -8) { self.buffer.append(UInt8(truncatingIfNeeded: bitLength >> UInt64(shift))) }
        self.block()
        var out: [UInt8] = []
        out.reserveCapacity(32)
        for value in self.h { for shift in stride(from: 24, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: value >> UInt32(shift))) } }
        return out
    }

    static func hash<S: Sequence>(_ bytes: S) -> [UInt8] where S.Element == UInt8 {
        var sha = SHA256()
        sha.absorb(bytes)
        return sha.finish()
    }

    mutating func absorb<S: Sequence>(_ bytes: S) where S.Element == UInt8 {
        for byte in bytes {
            self.total &+= 1
            self.buffer.append(byte)
            if self.buffer.count == 64 {
                self.block()
                self.buffer.removeAll(keepingCapacity: true)
            }
        }
    }

    private mutating func block() {
        @inline(__always) func rotr(_ x: UInt32, _ n: UInt32) -> UInt32 { (x >> n) | (x << (32 - n)) }
        for i in 0..<16 {
            let j = i * 4
            self.w[i] = UInt32(self.buffer[j]) << 24 | UInt32(self.buffer[j + 1]) << 16 | UInt32(self.buffer[j + 2]) << 8 | UInt32(self.buffer[j + 3])
        }
        for i in 16..<64 {
            let s0 = rotr(self.w[i - 15], 7) ^ rotr(self.w[i - 15], 18) ^ (self.w[i - 15] >> 3)
            let s1 = rotr(self.w[i - 2], 17) ^ rotr(self.w[i - 2], 19) ^ (self.w[i - 2] >> 10)
            self.w[i] = self.w[i - 16] &+ s0 &+ self.w[i - 7] &+ s1
        }
        var (a, b, c, d, e, f, g, hh) = (self.h[0], self.h[1], self.h[2], self.h[3], self.h[4], self.h[5], self.h[6], self.h[7])
        for i in 0..<64 {
            let s1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)
            let ch = (e & f) ^ (~e & g)
            let t1 = hh &+ s1 &+ ch &+ Self.k[i] &+ self.w[i]
            let s0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)
            let maj = (a & b) ^ (a & c) ^ (b & c)
            let t2 = s0 &+ maj
            (hh, g, f, e, d, c, b, a) = (g, f, e, d &+ t1, c, b, a, t1 &+ t2)
        }
        self.h[0] &+= a; self.h[1] &+= b; self.h[2] &+= c; self.h[3] &+= d
        self.h[4] &+= e; self.h[5] &+= f; self.h[6] &+= g; self.h[7] &+= hh
    }
}

/// HMAC-SHA256 (RFC 2104).
enum HMACSHA256 {
    static func mac(key: [UInt8], message: [UInt8]) -> [UInt8] {
        var key = key
        if key.count > 64 { key = SHA256.hash(key) }
        key += [UInt8](repeating: 0, count: 64 - key.count)
        var inner = SHA256()
        inner.absorb(key.map { $0 ^ 0x36 })
        inner.absorb(message)
        let innerHash = inner.finish()
        var outer = SHA256()
        outer.absorb(key.map { $0 ^ 0x5c })
        outer.absorb(innerHash)
        return outer.finish()
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
        let message = Array("\(id).\(timestamp).".utf8) + body
        return self.keys.map { "v1," + Data(HMACSHA256.mac(key: $0, message: message)).base64EncodedString() }.joined(separator: " ")
    }
}
