// aq-sign-bench: what Standard Webhooks signing costs per request, as aq-bridge signs (one
// HMAC-SHA256 per secret over "id.timestamp.body", keyed once per secret; base64). Prints nanoseconds per signature
// for a few body sizes.
//
// usage: aq-sign-bench [-n 200000] [--secrets 1]
import AQBridge
import Foundation

let arguments = CommandLine.arguments
func option(_ name: String, _ fallback: Int) -> Int {
    guard let index = arguments.firstIndex(of: name), index + 1 < arguments.count, let value = Int(arguments[index + 1]) else { return fallback }
    return value
}
let iterations = option("-n", 200_000)
let secretCount = option("--secrets", 1)
let secrets = (0..<secretCount).map { "whsec_" + Data("secret-number-\($0)-0123456789abcdef".utf8).base64EncodedString() }
let signer = try WebhookSigner(secrets: secrets).makeContext()

for size in [40, 200, 1024, 16 * 1024] {
    let body = [UInt8](repeating: 0x61, count: size)
    var sink = 0
    let started = ContinuousClock.now
    for i in 0..<iterations {
        sink &+= signer.signature(id: "task-\(i)", timestamp: 1_700_000_000 + i, body: body).utf8.count
    }
    let elapsed = ContinuousClock.now - started
    let nanos = (Double(elapsed.components.seconds) * 1e9 + Double(elapsed.components.attoseconds) / 1e9) / Double(iterations)
    print("body \(size) B, \(secretCount) secret(s): \(Int(nanos.rounded())) ns per signature (\(sink % 7))")
}
