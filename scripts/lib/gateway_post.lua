-- wrk: POST one task per request to aq-gateway, keep-alive. AQ_TOKEN from the environment.
wrk.method = "POST"
wrk.body = '{"callbackUrl":"http://127.0.0.1:18080/cb","payload":{"order":12345,"items":["a","b"],"note":"gateway benchmark"},"retries":3}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("AQ_TOKEN")
