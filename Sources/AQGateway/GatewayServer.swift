import AMQPClient
import AQTopology
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore

/// aq-gateway: the wire format over HTTP, on Hummingbird 2 (SwiftNIO) — keep-alive, pipelining,
/// chunked bodies and an idle timeout for slow clients come from it; limits and auth from us.
public enum GatewayServer {
    /// Runs until SIGTERM or SIGINT (graceful: requests in flight finish), then closes the
    /// broker connection. `onListening` gets the bound port (useful with port 0).
    public static func run(configuration: GatewayConfiguration, logger: Logger,
                           onListening: @escaping @Sendable (Int) async -> Void = { _ in }) async throws {
        let spec = try TopologyLoader.load(paths: configuration.topology)
        let (host, port) = try configuration.listenAddress()
        var amqp = try AMQPConfiguration(url: configuration.amqpURL)
        amqp.connectionName = "aq-gateway"
        let broker = BrokerLink(configuration: amqp, logger: logger)
        let api = GatewayAPI(spec: spec, configuration: configuration, broker: broker, logger: logger)
        if configuration.tokens.isEmpty {
            logger.warning("no tokens configured: every API request is refused (401); see AQ_GATEWAY_TOKENS")
        }
        let router = self.router(api, maxBodyBytes: configuration.maxBodyBytes)
        let app = Application(
            router: router,
            server: .http1(configuration: .init(idleTimeout: .seconds(60))),
            configuration: .init(address: .hostname(host, port: port), serverName: "aq-gateway"),
            onServerRunning: { channel in
                let bound = channel.localAddress?.port ?? port
                logger.info("aq-gateway listening", metadata: ["address": "http://\(host):\(bound)"])
                await onListening(bound)
            },
            logger: logger)
        let connecting = Task { await broker.connect() }
        defer { connecting.cancel() }
        try await app.runService()
        connecting.cancel()
        await broker.close()
    }

    static func json(_ reply: GatewayReply, extra: HTTPFields = [:]) -> Response {
        var headers: HTTPFields = [.contentType: "application/json"]
        headers.append(contentsOf: extra)
        return Response(status: .init(code: reply.status), headers: headers, body: .init(byteBuffer: ByteBuffer(string: reply.body + "\n")))
    }

    static let idempotencyKey = HTTPField.Name("Idempotency-Key")!
    static let traceparent = HTTPField.Name("traceparent")!

    static func router(_ api: GatewayAPI, maxBodyBytes: Int) -> Router<BasicRequestContext> {
        let router = Router()
        for kind in [GatewayAPI.Kind.tasks, .batches, .chains] {
            let route = "/v1/\(kind.rawValue)"
            router.post(RouterPath(route)) { request, _ -> Response in
                let reply = await self.create(kind, request, api, maxBodyBytes: maxBodyBytes)
                api.metrics.count(route, reply.status)
                return self.json(reply, extra: reply.status == 401 ? [.wwwAuthenticate: "Bearer"] : [:])
            }
        }
        router.get("/healthz") { _, _ -> Response in
            self.json(GatewayReply(status: 200, body: #"{"status":"ok"}"#))
        }
        router.get("/readyz") { _, _ -> Response in
            api.broker.isReady ? self.json(GatewayReply(status: 200, body: #"{"status":"ready"}"#))
                : self.json(GatewayError.reply(503, "broker_unavailable", "not connected to the broker"))
        }
        router.get("/metrics") { _, _ -> Response in
            Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
                     body: .init(byteBuffer: ByteBuffer(string: api.metrics.prometheus(ready: api.broker.isReady))))
        }
        return router
    }

    static func create(_ kind: GatewayAPI.Kind, _ request: Request, _ api: GatewayAPI, maxBodyBytes: Int) async -> GatewayReply {
        // Who asks comes first: an unauthenticated client gets 401 before its body is read.
        if case .failure(let error) = api.authenticate(request.headers[.authorization]) { return error.reply }
        if let length = request.headers[.contentLength].flatMap(Int.init), length > maxBodyBytes {
            return GatewayError.reply(413, "too_large", "the body is \(length) bytes; the limit is \(maxBodyBytes)")
        }
        let body: ByteBuffer
        do {
            body = try await request.body.collect(upTo: maxBodyBytes)
        } catch is NIOTooManyBytesError {
            return GatewayError.reply(413, "too_large", "the body is over the limit of \(maxBodyBytes) bytes")
        } catch {
            return GatewayError.reply(400, "bad_request", "could not read the body: \(error)")
        }
        let queue = request.uri.queryParameters.get("queue")
        return await api.create(kind, GatewayAPI.Request(
            authorization: request.headers[.authorization], queue: queue, idempotencyKey: request.headers[self.idempotencyKey],
            traceparent: request.headers[self.traceparent], body: Array(buffer: body)))
    }
}
