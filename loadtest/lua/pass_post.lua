-- Pass-through with a body: a POST to a path no route has (no key), the same body.
function init(args) post_init(args) end
function request()
   return pass_post()
end
