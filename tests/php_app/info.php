<?php
echo $_SERVER['SCRIPT_NAME'] . "|" . ($_SERVER['PATH_INFO'] ?? '') . "|" . $_SERVER['SCRIPT_FILENAME'];
