-- Pass-through: a GET no route guards (static request, wrk's fastest path).
wrk.method = "GET"
wrk.path = "/v1/ping"
wrk.headers["Authorization"] = AUTH
