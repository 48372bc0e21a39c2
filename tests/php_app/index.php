<?php
// The front controller of the gateway tests: every path that names no file
// lands here (try_files), and the route is taken from REQUEST_URI.
$path = parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH);
$pool = getenv('POOL') ?: '';
header('X-Pool: ' . $pool);
if (getenv('SLOW_POOL')) {
    usleep(600000);
}
switch ($path) {
case '/':
    echo "home of $pool\n";
    break;
case '/server':
    header('Content-Type: application/json');
    $keys = ['SCRIPT_NAME', 'SCRIPT_FILENAME', 'PATH_INFO', 'REQUEST_URI', 'DOCUMENT_ROOT',
             'DOCUMENT_URI', 'REMOTE_ADDR', 'HTTPS', 'HTTP_PROXY', 'HTTP_X_FORWARDED_FOR',
             'HTTP_X_REMOTE_USER', 'SERVER_NAME', 'CONTENT_LENGTH', 'QUERY_STRING', 'GREETING'];
    $out = [];
    foreach ($keys as $k) {
        $out[$k] = $_SERVER[$k] ?? null;
    }
    $out['getenv_HTTP_PROXY'] = getenv('HTTP_PROXY');
    echo json_encode($out);
    break;
case '/session':
    session_save_path(getenv('SESSION_DIR'));
    session_start();
    $_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
    echo "visits=" . $_SESSION['n'];
    break;
case '/form':
    if ($_SERVER['REQUEST_METHOD'] !== 'POST') {
        http_response_code(405);
        break;
    }
    echo "hello " . ($_POST['name'] ?? '?') . " age " . ($_POST['age'] ?? '?');
    break;
case '/upload':
    $f = $_FILES['file'] ?? null;
    if (!$f || $f['error'] !== UPLOAD_ERR_OK) {
        http_response_code(400);
        echo "upload error " . ($f['error'] ?? 'none');
        break;
    }
    echo $f['size'] . " " . hash_file('sha256', $f['tmp_name']);
    break;
case '/download':
    $mib = (int)($_GET['mib'] ?? 1);
    header('Content-Type: application/octet-stream');
    $block = str_repeat('x', 1 << 20);
    for ($i = 0; $i < $mib; $i++) {
        echo $block;
        flush();
    }
    break;
case '/input':
    $body = file_get_contents('php://input');
    echo strlen($body) . " " . hash('sha256', $body) . " " . ($_SERVER['CONTENT_LENGTH'] ?? '')
        . " " . ($_SERVER['HTTP_TRANSFER_ENCODING'] ?? '-');
    break;
case '/slow':
    sleep((int)($_GET['s'] ?? 1));
    echo "slept";
    break;
case '/tick':
    // One line per second, until the client goes away.
    for ($i = 0; $i < 60; $i++) {
        echo "$i\n";
        flush();
        file_put_contents(getenv('STATE_DIR') . '/tick-' . $_GET['id'], "$i\n");
        sleep(1);
    }
    break;
case '/count':
    // Each run writes "id pool" when it starts, then works: a request run
    // twice shows twice, and one cut by a dying pool shows where it began.
    file_put_contents(getenv('STATE_DIR') . '/count.log', ($_GET['id'] ?? '') . " $pool\n", FILE_APPEND | LOCK_EX);
    usleep((int)($_GET['us'] ?? 0));
    echo "counted";
    break;
case '/stderr':
    error_log("a warning the gateway must log");
    http_response_code(500);
    echo "failed";
    break;
default:
    http_response_code(404);
    echo "no route for $path";
}
