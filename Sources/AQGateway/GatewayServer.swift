import AMQPClient
import AQBridge
import AQTopology
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOPosix

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
        let monitor = EventMonitor()
        let dashboard = Dashboard(api: api, monitor: monitor, target: try BrokerTarget(amqpURL: configuration.amqpURL, managementURL: configuration.managementURL),
                                  logger: logger)
        let router = self.router(api, monitor: monitor, maxBodyBytes: configuration.maxBodyBytes)
        dashboard.register(on: router)
        let app = Application(
            router: router,
            server: .http1(configuration: .init(idleTimeout: .seconds(60))),
            configuration: .init(address: .hostname(host, port: port), serverName: "aq-gateway"),
            onServerRunning: { channel in
                let bound = channel.localAddress?.port ?? port
                logger.info("aq-gateway listening", metadata: ["address": "http://\(host):\(bound)"])
                await onListening(bound)
            },
            eventLoopGroupProvider: configuration.threads > 0 ? .shared(MultiThreadedEventLoopGroup(numberOfThreads: configuration.threads)) : .singleton,
            logger: logger)
        let connecting = Task { await broker.connect() }
        // The bridges' user (the same login, as in most deployments) and AQ_TRUSTED_PUBLISHERS.
        let trusted = Set([amqp.user] + (ProcessInfo.processInfo.environment["AQ_TRUSTED_PUBLISHERS"] ?? "")
            .split(whereSeparator: { $0 == "," || $0 == " " }).map(String.init))
        let watching = Task { await monitor.run(connection: { broker.connection }, exchange: spec.eventsExchange, trusted: trusted, logger: logger) }
        defer {
            connecting.cancel()
            watching.cancel()
        }
        try await app.runService()
        connecting.cancel()
        watching.cancel()
        await broker.close()
    }

    static func json(_ reply: GatewayReply, extra: HTTPFields = [:]) -> Response {
        var headers: HTTPFields = [.contentType: "application/json"]
        headers.append(contentsOf: extra)
        return Response(status: .init(code: reply.status), headers: headers, body: .init(byteBuffer: ByteBuffer(string: reply.body + "\n")))
    }

    static let idempotencyKey = HTTPField.Name("Idempotency-Key")!
    static let traceparent = HTTPField.Name("traceparent")!

    static func router(_ api: GatewayAPI, monitor: EventMonitor, maxBodyBytes: Int) -> Router<BasicRequestContext> {
        let router = Router()
        router.get("/") { _, _ -> Response in Response(status: .seeOther, headers: [.location: "/dashboard"]) }
        // Progress: what the lifecycle events said (ends always; counts and steps with the
        // bridges' `events: all`); a batch not seen yet is open while its reply queue exists.
        router.get("/v1/batches/:id") { request, context -> Response in
            guard let token = api.token(for: request.headers[.authorization]) else { return self.json(GatewayError.unauthorized) }
            let id = context.parameters.get("id") ?? ""
            // A token sees the batches of its own work queues; whether an unseen one is open,
            // only an operator token (its queue is unknown).
            if let batch = monitor.batch(id), token.allows(queue: batch.queue) {
                return self.json(GatewayReply(status: 200, body: "{\"batchId\":\(JSONScan.quote(batch.id)),\"queue\":\(JSONScan.quote(batch.queue)),\"status\":\(JSONScan.quote(batch.status)),\"size\":\(batch.size),\"settled\":\(batch.settled),\"failed\":\(batch.failed)}"))
            }
            if token.allows(queue: "*"), monitor.batch(id) == nil, await api.batchIsOpen(id) {
                return self.json(GatewayReply(status: 200, body: "{\"batchId\":\(JSONScan.quote(id)),\"status\":\"running\"}"))
            }
            return self.json(GatewayError.reply(404, "not_found", "no batch '\(id.prefix(100))' is open, and none ended since this gateway started"))
        }
        router.get("/v1/chains/:id") { request, context -> Response in
            guard let token = api.token(for: request.headers[.authorization]) else { return self.json(GatewayError.unauthorized) }
            let id = context.parameters.get("id") ?? ""
            guard let chain = monitor.chain(id), token.allows(queue: chain.queue) else {
                return self.json(GatewayError.reply(404, "not_found", "no event of chain '\(id.prefix(100))' since this gateway started (progress needs the bridges' events: all)"))
            }
            var body = "{\"chainId\":\(JSONScan.quote(chain.id)),\"queue\":\(JSONScan.quote(chain.queue)),\"status\":\(JSONScan.quote(chain.status)),\"stepsCompleted\":\(chain.step)"
            if let steps = chain.steps { body += ",\"steps\":\(steps)" }
            if let failed = chain.failedStep { body += ",\"failedStep\":\(failed)" }
            return self.json(GatewayReply(status: 200, body: body + "}"))
        }
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
        guard let token = api.token(for: request.headers[.authorization]) else { return GatewayError.unauthorized }
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
            traceparent: request.headers[self.traceparent], body: Array(buffer: body)), token: token)
    }
}
